//! ListDevices and GetDevice: the devices the buffer knows (see
//! `buffer/devices.rs`), with their newest reading (its message from the
//! cache shared with watchers and pages, `encoded.rs`) and connection
//! status.

use super::{
    auth::Caller, convert::device_id_field, error::ApiError, page_token, wire, Encoded,
    EncodedGetDeviceResponse, EncodedListDevicesResponse, Shared,
};
use crate::{
    buffer::{DeviceEntry, LastReading},
    proto::{DeviceView, GetDeviceRequest, ListDevicesRequest},
    topic::MAX_DEVICE_ID_BYTES,
};

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

    let basic = match DeviceView::try_from(req.view) {
        Ok(DeviceView::Unspecified | DeviceView::Full) => false,
        Ok(DeviceView::Basic) => true,
        Err(_) => {
            return Err(ApiError::invalid(
                "view",
                format!("{} is no DeviceView", req.view),
            ))
        }
    };

    let visible = |id: &str| caller.read.allows(id);
    let field = wire::LIST_DEVICES_DEVICES;
    let out = if basic {
        // Only the newest reading's number and time: nothing is copied out.
        let at = |seq, received_at| Some((seq, received_at));
        let (devices, more) = shared
            .hub
            .devices(&prefix, after.as_deref(), visible, limit, at);
        page(&devices, more, hash, |device, out| {
            let newest = match &device.last_reading {
                Some(LastReading::Found((seq, at))) => Some((*seq, *at)),
                Some(LastReading::Copied(r)) => Some((r.seq, r.received_at)),
                None => None,
            };
            let info = &device.info;
            let newest =
                newest.map(|(seq, at)| wire::basic_reading_message(seq, &info.device_id, at));
            wire::put_device_field(field, info, newest.as_deref(), out);
        })
    } else {
        // Newest readings whose messages are kept are not copied out.
        let encoded = &shared.encoded;
        let find = |seq, received_at| encoded.find(seq, received_at);
        let (devices, more) = shared
            .hub
            .devices(&prefix, after.as_deref(), visible, limit, find);
        page(&devices, more, hash, |device, out| {
            encoded.put_device_field(field, device, out)
        })
    };
    Ok(Encoded::from_bytes(out.into()))
}

/// A ListDevicesResponse of `devices`, each written by `put`, cut to the
/// page's byte budget (one device at least), with the token of the next
/// page when `more` follow or some did not fit.
fn page<K>(
    devices: &[DeviceEntry<K>],
    more: bool,
    hash: u64,
    mut put: impl FnMut(&DeviceEntry<K>, &mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(devices.len() * 256);
    let mut fits = devices.len();
    for (i, device) in devices.iter().enumerate() {
        let before = out.len();
        put(device, &mut out);
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
    out
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
