//! Who may call what. An interceptor in front of the `DeviceHub` service
//! turns the `authorization: Bearer <JWT>` metadata into a [`Caller`]
//! (subject and scopes); the handlers check the scopes by device. The
//! health and reflection services are not behind it: probes and grpcurl's
//! `list`/`describe` stay open.
//!
//! Tokens are verified with a maintained crate (jsonwebtoken) against the
//! public keys given with `--auth-jwt-key` (RS256/384/512, PS256/384/512,
//! ES256/384, EdDSA; a key only verifies its own algorithm family, and
//! shared-secret HS* tokens are never accepted). `exp` is required, `nbf`
//! is checked when present (both with [`LEEWAY_SECS`]); `iss` and `aud` are
//! checked when configured. Error messages say what is wrong with a token
//! and never echo it. The key files are re-read when they change (the
//! TLS certificate's [`WatchedFiles`]); a change that does not load keeps
//! the previous keys.
//!
//! Scopes, in the space-separated `scope` claim: `readings:read`
//! (ListReadings, WatchReadings, ListDevices, GetDevice, AggregateReadings),
//! `commands:send`
//! (SendCommand, StreamCommands, CancelCommand), `commands:read`
//! (GetCommand, ListCommands, WatchCommands), `state:read` (GetDeviceState,
//! WatchDeviceState) and `state:write` (UpdateDesiredState), each optionally
//! narrowed to
//! devices with a suffix:
//! `readings:read:greenhouse-*`, `commands:send:pump-7` (`*` matches any run
//! of characters). Without auth configured every caller may do everything.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{metadata::MetadataMap, Request, Status};
use tracing::{info, warn};

use super::error::ApiError;
use crate::{
    config::AuthConfig, listener::ConnInfo, scope::DeviceSet, sync, watched_files::WatchedFiles,
};

/// The read scope, and its prefix for a narrowed one.
const READ_SCOPE: &str = "readings:read";
/// The send scope, and its prefix for a narrowed one.
const SEND_SCOPE: &str = "commands:send";
/// The scope to read persistent commands, and its prefix for a narrowed one.
const COMMANDS_READ_SCOPE: &str = "commands:read";
/// The scopes to read device states and to change desired states.
const STATE_READ_SCOPE: &str = "state:read";
const STATE_WRITE_SCOPE: &str = "state:write";
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 5;

/// Who is calling and what they may do.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's `sub` (empty without auth).
    pub subject: String,
    /// Devices whose readings the caller may see.
    pub read: DeviceSet,
    /// Devices the caller may command.
    pub send: DeviceSet,
    /// Devices whose persistent commands the caller may read.
    pub read_commands: DeviceSet,
    /// Devices whose state the caller may read.
    pub read_state: DeviceSet,
    /// Devices whose desired state the caller may change.
    pub write_state: DeviceSet,
    /// Who the per-client limits count against: the token's subject when
    /// there is one (all its connections together), else the remote IP
    /// address (many connections from one host are one client).
    pub client: Arc<str>,
}

impl Caller {
    /// Anyone, when auth is not configured: every scope.
    fn anyone() -> Self {
        Self {
            subject: String::new(),
            read: DeviceSet::All,
            send: DeviceSet::All,
            read_commands: DeviceSet::All,
            read_state: DeviceSet::All,
            write_state: DeviceSet::All,
            client: Arc::from(""),
        }
    }

    /// The caller the interceptor attached to `request`.
    pub fn of<T>(request: &Request<T>) -> Result<Caller, ApiError> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Internal("no caller on an intercepted request".into()))
    }

    /// Checks the read scope: any at all, and for `device_id` when one is named.
    pub fn may_read(&self, device_id: &str) -> Result<(), ApiError> {
        check(&self.read, READ_SCOPE, device_id)
    }

    /// Checks the send scope for `device_id`.
    pub fn may_send(&self, device_id: &str) -> Result<(), ApiError> {
        check(&self.send, SEND_SCOPE, device_id)
    }

    /// Checks the scope to read persistent commands: any at all, and for
    /// `device_id` when one is named.
    pub fn may_read_commands(&self, device_id: &str) -> Result<(), ApiError> {
        check(&self.read_commands, COMMANDS_READ_SCOPE, device_id)
    }

    /// Checks the scope to read device states: any at all, and for
    /// `device_id` when one is named.
    pub fn may_read_state(&self, device_id: &str) -> Result<(), ApiError> {
        check(&self.read_state, STATE_READ_SCOPE, device_id)
    }

    /// Checks the scope to change `device_id`'s desired state.
    pub fn may_write_state(&self, device_id: &str) -> Result<(), ApiError> {
        check(&self.write_state, STATE_WRITE_SCOPE, device_id)
    }
}

fn check(set: &DeviceSet, scope: &str, device_id: &str) -> Result<(), ApiError> {
    if set.is_empty() {
        return Err(ApiError::PermissionDenied(format!(
            "this call needs the scope {scope} (or {scope}:<devices>)"
        )));
    }
    if !device_id.is_empty() && !set.allows(device_id) {
        return Err(ApiError::PermissionDenied(format!(
            "device {device_id:?} is outside this token's {scope} scope"
        )));
    }
    Ok(())
}

/// One verification key and the algorithm family it verifies.
struct Key {
    key: DecodingKey,
    algorithms: &'static [Algorithm],
}

/// Verifies tokens; cheap to clone into tonic's interceptor.
#[derive(Clone)]
pub struct Authenticator {
    keys: Option<Arc<Keys>>,
    /// Stops the key files' watcher once the last clone is gone (when the
    /// service stops): `crate::run` owns no token for it.
    _watching: Option<Arc<DropGuard>>,
}

struct Keys {
    /// The keys in use, swapped whole when the files change. A std lock:
    /// read once per call for an `Arc` clone, never held across an `.await`.
    current: RwLock<Arc<KeySet>>,
    issuer: Option<String>,
    audience: Option<String>,
    /// Entries dropped from a full verified cache to make room.
    evictions: AtomicU64,
}

/// A set of keys and the tokens verified with them.
struct KeySet {
    keys: Vec<Key>,
    /// Tokens already verified, so that a client calling many times with
    /// one token pays for the signature once (ES256 verification is about
    /// half a millisecond, more than the call; see BENCHMARKS.md). An entry
    /// is used only until the token's `exp`. A std mutex held for a lookup
    /// or an insert. Per key set, so that a token verified by a key that a
    /// rotation removed stops working with the rotation, not at its `exp`.
    verified: Mutex<HashMap<String, Verified>>,
}

impl KeySet {
    fn new(keys: Vec<Key>) -> Arc<Self> {
        Arc::new(Self {
            keys,
            verified: Mutex::default(),
        })
    }
}

/// A verified token's caller (without the connection-specific client key)
/// and its expiry, in seconds since the epoch.
#[derive(Clone)]
struct Verified {
    caller: Caller,
    exp: u64,
}

/// Most verified tokens remembered.
const VERIFIED_CACHE: usize = 1024;

/// Why the configured keys could not be used.
#[derive(Debug, thiserror::Error)]
#[error("--auth-jwt-key: {0}")]
pub struct KeyError(String);

impl Authenticator {
    /// From the configuration: `None` lets every call through as [`Caller::anyone`].
    pub fn new(config: Option<&AuthConfig>) -> Result<Self, KeyError> {
        let Some(config) = config else {
            return Ok(Self {
                keys: None,
                _watching: None,
            });
        };
        // Stamped before the keys are parsed: a change from here on is seen.
        let files = WatchedFiles::new(config.key_files.clone());
        let keys = parse_keys(config.public_keys_pem.iter().map(Vec::as_slice))?;
        if config.audience.is_none() {
            // Not refused: a single-service issuer may mint no `aud` at
            // all. But the operator should know what they accept.
            warn!(
                issuer = config.issuer.as_deref().unwrap_or("(any)"),
                keys = keys.len(),
                "auth without --auth-jwt-audience: any token signed by the configured keys (from the issuer, if set) is accepted, whatever service it was minted for; set --auth-jwt-audience to this service's audience"
            );
        }
        let keys = Arc::new(Keys {
            current: RwLock::new(KeySet::new(keys)),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            evictions: AtomicU64::new(0),
        });
        // Outside a runtime (a unit test, a program that only checks its
        // configuration) there is nothing to watch with; nothing is re-read.
        let watching = match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !config.key_files.is_empty() => {
                let stop = CancellationToken::new();
                let (watched, paths) = (keys.clone(), config.key_files.clone());
                runtime.spawn(files.follow(stop.clone(), move || watched.reload(&paths)));
                Some(Arc::new(stop.drop_guard()))
            }
            _ => None,
        };
        Ok(Self {
            keys: Some(keys),
            _watching: watching,
        })
    }

    /// Verified tokens dropped from the full cache to make room (counted
    /// for the stats line: a steady count means more live tokens than
    /// the cache holds, so signatures are checked again).
    pub fn cache_evictions(&self) -> u64 {
        self.keys
            .as_ref()
            .map_or(0, |k| k.evictions.load(Ordering::Relaxed))
    }

    /// The interceptor: attaches the [`Caller`] or refuses the call.
    pub fn intercept(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let mut caller = match &self.keys {
            None => Caller::anyone(),
            Some(keys) => keys.caller(request.metadata())?,
        };
        if !caller.subject.is_empty() {
            // Joins the call's span (telemetry/calls/), entered here.
            tracing::Span::current().record("caller", caller.subject.as_str());
        }
        let peer = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(ConnInfo::remote_addr);
        // Without a token, a client is its address, not its connection: ten
        // connections from one host share one client's limits.
        caller.client = match (caller.subject.as_str(), peer) {
            ("", Some(peer)) => format!("peer {}", peer.ip()).into(),
            ("", None) => "peer unknown".into(),
            (subject, _) => format!("sub {subject}").into(),
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

impl Keys {
    /// Re-reads the key files after a change; if they do not all load (a
    /// half-written or wrong file), keeps the keys in use and says why
    /// (the file and what is wrong, never its contents).
    fn reload(&self, paths: &[PathBuf]) {
        match read_keys(paths) {
            Ok(keys) => {
                let count = keys.len();
                *sync::write(&self.current) = KeySet::new(keys);
                info!(keys = count, "JWT keys reloaded");
            }
            Err(error) => {
                warn!(%error, "JWT key files changed but do not load; keeping the previous keys")
            }
        }
    }

    fn caller(&self, metadata: &MetadataMap) -> Result<Caller, ApiError> {
        let unauthenticated = |why: &str| ApiError::Unauthenticated(why.to_owned());
        let value = metadata
            .get("authorization")
            .ok_or_else(|| unauthenticated("missing `authorization: Bearer <token>` metadata"))?;
        let token =
            value.to_str().ok().and_then(bearer_token).ok_or_else(|| {
                unauthenticated("the authorization metadata is not `Bearer <token>`")
            })?;
        let now = now_secs();
        // One set for the whole call, so a reload meanwhile cannot mix them.
        let set = sync::read(&self.current).clone();
        if let Some(hit) = sync::lock(&set.verified).get(token) {
            if now < hit.exp {
                return Ok(hit.caller.clone());
            }
        }
        let verified = self.verify(&set, token)?;
        let caller = verified.caller.clone();
        self.remember(&set, token, verified, now);
        Ok(caller)
    }

    /// Keeps `verified` for later calls with the same token, within the
    /// cache's bound: expired entries go first, then any one.
    fn remember(&self, set: &KeySet, token: &str, verified: Verified, now: u64) {
        let mut cache = sync::lock(&set.verified);
        if cache.len() >= VERIFIED_CACHE {
            cache.retain(|_, v| now < v.exp);
        }
        if cache.len() >= VERIFIED_CACHE {
            if let Some(any) = cache.keys().next().cloned() {
                cache.remove(&any);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        cache.insert(token.to_owned(), verified);
    }

    /// Checks the token's signature and claims.
    fn verify(&self, set: &KeySet, token: &str) -> Result<Verified, ApiError> {
        let unauthenticated = |why: &str| ApiError::Unauthenticated(why.to_owned());
        let header = decode_header(token).map_err(|_| unauthenticated("the token is malformed"))?;
        let mut last = ErrorKind::InvalidAlgorithm;
        for key in set
            .keys
            .iter()
            .filter(|k| k.algorithms.contains(&header.alg))
        {
            match decode::<Claims>(token, &key.key, &self.validation(header.alg)) {
                Ok(data) => {
                    let exp = data.claims.exp;
                    return Ok(Verified {
                        caller: data.claims.into_caller(),
                        exp,
                    });
                }
                Err(error) => match error.into_kind() {
                    ErrorKind::InvalidSignature => last = ErrorKind::InvalidSignature,
                    other => return Err(unauthenticated(&why(&other))),
                },
            }
        }
        Err(match last {
            ErrorKind::InvalidSignature => {
                unauthenticated("the token's signature does not verify against any configured key")
            }
            _ => ApiError::Unauthenticated(format!(
                "the token's algorithm {:?} matches no configured key",
                header.alg
            )),
        })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        // jsonwebtoken checks `nbf` only when asked: without this a token
        // minted for later (a pre-issued credential) would work at once.
        // Optional like in RFC 7519, with the same leeway as `exp`.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        validation
    }
}

/// The token of an `authorization` value `Bearer <token>`. The scheme is
/// case-insensitive (RFC 7235 section 2.1; RFC 6750 uses `Bearer`, but
/// clients send `bearer` and `BEARER` too), and one or more spaces may
/// separate it from the token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// What is wrong with a token, for the client.
fn why(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "the token's issuer (iss) is not accepted".into(),
        ErrorKind::InvalidAudience => "the token's audience (aud) is not accepted".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("the token's {claim} claim is malformed"),
        _ => "the token is malformed".into(),
    }
}

/// The claims devicehub reads; `exp`, `iss`, `aud` are checked by the crate.
#[derive(serde::Deserialize)]
struct Claims {
    /// Required (the validation insists), so never the default here.
    #[serde(default)]
    exp: u64,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    scope: String,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Claims {
    fn into_caller(self) -> Caller {
        Caller {
            read: device_set(&self.scope, READ_SCOPE),
            send: device_set(&self.scope, SEND_SCOPE),
            read_commands: device_set(&self.scope, COMMANDS_READ_SCOPE),
            read_state: device_set(&self.scope, STATE_READ_SCOPE),
            write_state: device_set(&self.scope, STATE_WRITE_SCOPE),
            subject: self.sub,
            client: Arc::from(""),
        }
    }
}

/// The devices `scopes` grant for `name`: all for the bare scope, the union
/// of the patterns of its narrowed forms (`name:pattern`), else none.
fn device_set(scopes: &str, name: &str) -> DeviceSet {
    let mut patterns = Vec::new();
    for scope in scopes.split_whitespace() {
        if scope == name {
            return DeviceSet::All;
        }
        if let Some(pattern) = scope.strip_prefix(name).and_then(|r| r.strip_prefix(':')) {
            patterns.push(pattern.to_owned());
        }
    }
    DeviceSet::Patterns(patterns.into())
}

/// The keys in `pems` (each may hold several); at least one.
fn parse_keys<'a>(pems: impl Iterator<Item = &'a [u8]>) -> Result<Vec<Key>, KeyError> {
    let mut keys = Vec::new();
    for pem in pems {
        for block in pem_blocks(pem) {
            keys.push(public_key(block)?);
        }
    }
    if keys.is_empty() {
        return Err(KeyError("no PEM public key found".into()));
    }
    Ok(keys)
}

/// The keys of the files at `paths`. Unlike at startup, every file must
/// hold a key: a file caught half-written (empty, or cut inside its first
/// key) is then refused rather than taken for a rotation to fewer keys. An
/// error names the file that is wrong.
fn read_keys(paths: &[PathBuf]) -> Result<Vec<Key>, KeyError> {
    let mut keys = Vec::new();
    for path in paths {
        let pem = std::fs::read(path)
            .map_err(|error| KeyError(format!("{}: {error}", path.display())))?;
        let in_file = parse_keys(std::iter::once(pem.as_slice()))
            .map_err(|KeyError(why)| KeyError(format!("{}: {why}", path.display())))?;
        keys.extend(in_file);
    }
    Ok(keys)
}

/// The PEM blocks of a file that may hold several keys.
fn pem_blocks(text: &[u8]) -> Vec<&[u8]> {
    const END: &[u8] = b"-----END ";
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = find(rest, b"-----BEGIN ") {
        let Some(end) = find(&rest[start..], END) else {
            break;
        };
        let after_end = start + end + END.len();
        // The end line's own closing dashes.
        let close = find(&rest[after_end..], b"-----").map_or(rest.len(), |i| after_end + i + 5);
        blocks.push(&rest[start..close]);
        rest = &rest[close..];
    }
    blocks
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A public key of any supported kind, with the algorithms it verifies.
fn public_key(pem: &[u8]) -> Result<Key, KeyError> {
    const RSA: &[Algorithm] = &[
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ];
    const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
    const ED: &[Algorithm] = &[Algorithm::EdDSA];
    let key = |key: DecodingKey, algorithms| Key { key, algorithms };
    DecodingKey::from_rsa_pem(pem)
        .map(|k| key(k, RSA))
        .or_else(|_| DecodingKey::from_ec_pem(pem).map(|k| key(k, EC)))
        .or_else(|_| DecodingKey::from_ed_pem(pem).map(|k| key(k, ED)))
        .map_err(|_| {
            KeyError("a PEM block is not an RSA, EC (P-256/P-384) or Ed25519 public key".into())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_narrow_by_device() {
        let scopes = "openid readings:read:greenhouse-* commands:send:pump-7 other";
        let caller = Claims {
            exp: 0,
            sub: "svc".into(),
            scope: scopes.into(),
        }
        .into_caller();
        assert!(caller.may_read("greenhouse-3").is_ok());
        assert!(
            caller.may_read("").is_ok(),
            "a list with no device is narrowed, not refused"
        );
        assert!(caller.may_read("pump-7").is_err());
        assert!(caller.may_send("pump-7").is_ok());
        assert!(caller.may_send("pump-8").is_err());
        let none = Claims {
            exp: 0,
            sub: String::new(),
            scope: "readings:reader commands:sending".into(),
        }
        .into_caller();
        assert!(none.may_read("").is_err() && none.may_send("x").is_err());
        assert_eq!(device_set("readings:read x", READ_SCOPE), DeviceSet::All);
    }

    #[test]
    fn the_verified_cache_is_bounded_and_forgets_expired_tokens() {
        let keys = Keys {
            current: RwLock::new(KeySet::new(Vec::new())),
            issuer: None,
            audience: None,
            evictions: AtomicU64::new(0),
        };
        let set = KeySet::new(Vec::new());
        let verified = |exp| Verified {
            caller: Caller::anyone(),
            exp,
        };
        let now = 1_000;
        for i in 0..VERIFIED_CACHE {
            // Half of them already expired.
            keys.remember(
                &set,
                &format!("t{i}"),
                verified(if i % 2 == 0 { 10 } else { 5_000 }),
                now,
            );
        }
        keys.remember(&set, "one more", verified(5_000), now);
        assert_eq!(sync::lock(&set.verified).len(), VERIFIED_CACHE / 2 + 1);
        assert_eq!(
            keys.evictions.load(Ordering::Relaxed),
            0,
            "expired ones went first"
        );
        for i in 0..VERIFIED_CACHE {
            keys.remember(&set, &format!("live{i}"), verified(5_000), now);
        }
        assert_eq!(sync::lock(&set.verified).len(), VERIFIED_CACHE);
        assert!(keys.evictions.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in [
            "Bearer t.o.k",
            "bearer t.o.k",
            "BEARER t.o.k",
            "bEaReR   t.o.k ",
        ] {
            assert_eq!(bearer_token(value), Some("t.o.k"), "{value:?}");
        }
        for value in [
            "Basic dXNlcg==",
            "Bearer",
            "Bearer ",
            "Bearert.o.k",
            "t.o.k",
            "",
        ] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }

    #[test]
    fn pem_files_split_into_blocks() {
        let two = b"junk\n-----BEGIN PUBLIC KEY-----\nAAA\n-----END PUBLIC KEY-----\n\n-----BEGIN PUBLIC KEY-----\nBBB\n-----END PUBLIC KEY-----\n";
        let blocks = pem_blocks(two);
        assert_eq!(blocks.len(), 2);
        assert!(blocks[0].starts_with(b"-----BEGIN") && blocks[0].ends_with(b"KEY-----"));
        assert!(blocks[1].windows(3).any(|w| w == b"BBB"));
    }
}
