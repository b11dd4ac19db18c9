//! ListDevices and GetDevice: the devices the buffer knows (see
//! `buffer/devices.rs`), with their newest reading (its message from the
//! cache shared with watchers and pages, `encoded.rs`) and connection
//! status.

use super::{
    auth::Caller, convert::device_id_field, error::ApiError, page_token, wire, Encoded,
    EncodedGetDeviceResponse, EncodedListDevicesResponse, Shared,
};
use crate::{proto::GetDeviceRequest, proto::ListDevicesRequest, topic::MAX_DEVICE_ID_BYTES};

use page_token::MAX_PAGE_BYTES;

/// Serves one ListDevices call.
pub(super) fn list(
    shared: &Shared,
    caller: &Caller,
    req: ListDevicesRequest,
) -> Result<EncodedListDevicesResponse, ApiError> {
    caller.may_read("")?;
    let limit = page_token::page_size(req.page_size)?;
    if req.device_id_prefix.len() > MAX_DEVICE_ID_BYTES {
        return Err(ApiError::invalid(
            "device_id_prefix",
            format!("is longer than a device id ({MAX_DEVICE_ID_BYTES} bytes)"),
        ));
    }
    let prefix = req.device_id_prefix;
    let mut hash = page_token::Fnv::new();
    hash.eat(b"ListDevices\xff");
    hash.eat(prefix.as_bytes());
    let hash = hash.finish();
    let after = match req.page_token.as_str() {
        "" => None,
        token => Some(page_token::decode_key(token, hash)?),
    };

    // Newest readings whose messages are kept are not copied out.
    let encoded = &shared.encoded;
    let (devices, more) = shared.hub.devices(
        &prefix,
        after.as_deref(),
        |id| caller.read.allows(id),
        limit,
        |seq, received_at| encoded.find(seq, received_at),
    );
    let mut out = Vec::with_capacity(devices.len() * 256);
    let mut fits = devices.len();
    for (i, device) in devices.iter().enumerate() {
        let before = out.len();
        encoded.put_device_field(wire::LIST_DEVICES_DEVICES, device, &mut out);
        if i > 0 && out.len() > MAX_PAGE_BYTES {
            out.truncate(before);
            fits = i;
            break;
        }
    }
    if !devices.is_empty() && (more || fits < devices.len()) {
        let last = &devices[fits - 1].info.device_id;
        let token = page_token::encode_key(last, hash);
        wire::put_str(wire::LIST_DEVICES_NEXT_PAGE_TOKEN, &token, &mut out);
    }
    Ok(Encoded::from_bytes(out.into()))
}

/// Serves one GetDevice call.
pub(super) fn get(
    shared: &Shared,
    caller: &Caller,
    req: GetDeviceRequest,
) -> Result<EncodedGetDeviceResponse, ApiError> {
    let device_id = device_id_field(&req.device_id)?;
    caller.may_read(&device_id)?;
    let encoded = &shared.encoded;
    let device = shared
        .hub
        .device(&device_id, |seq, received_at| {
            encoded.find(seq, received_at)
        })
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "device {device_id:?} has not been heard from since the service started"
            ))
        })?;
    let mut out = Vec::new();
    encoded.put_device_field(wire::GET_DEVICE_DEVICE, &device, &mut out);
    Ok(Encoded::from_bytes(out.into()))
}
