//! MQTT topic rules: device ids, topic filters and the topic templates that map
//! a device id to its readings and commands topics.
//!
//! Everything here is pure and allocation-light: it runs on the ingest path
//! (device id from a topic) and per request (validation).

use std::fmt;

/// The placeholder a topic template may contain, as one whole topic level.
pub const DEVICE_ID_PLACEHOLDER: &str = "{device_id}";

/// The longest device id accepted, in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 256;

/// MQTT's own limit on a topic name or filter, in bytes.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// Why a device id, topic or filter was refused. The text is meant for the
/// client, prefixed by the name of the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TopicError(String);

/// Checks that `id` can stand as one topic level: non-empty, at most
/// [`MAX_DEVICE_ID_BYTES`], free of `/`, `+`, `#` and of every character
/// MQTT receivers reject ([`check_topic_text`]).
pub fn validate_device_id(id: &str) -> Result<(), TopicError> {
    if id.is_empty() {
        return Err(TopicError("must not be empty".into()));
    }
    if id.len() > MAX_DEVICE_ID_BYTES {
        return Err(TopicError(format!(
            "is {} bytes long; the limit is {MAX_DEVICE_ID_BYTES}",
            id.len()
        )));
    }
    check_topic_text(id)?;
    if let Some(c) = id.chars().find(|c| matches!(c, '/' | '+' | '#')) {
        return Err(TopicError(format!(
            "must be a single topic level without '/', '+' or '#'; found {c:?}"
        )));
    }
    Ok(())
}

/// Checks that `text` holds no character that MQTT receivers may reject in
/// a topic (MQTT 3.1.1 section 1.5.3, MQTT 5 section 1.5.4): U+0000, the
/// control characters U+0001–U+001F and U+007F–U+009F, and the
/// noncharacters U+FDD0–U+FDEF and U+nFFFE/U+nFFFF. Mosquitto drops the
/// whole connection for a PUBLISH or SUBSCRIBE holding one, so everything
/// that may end up in a topic is checked before it is sent.
pub fn check_topic_text(text: &str) -> Result<(), TopicError> {
    let Some((at, c)) = text.char_indices().find(|&(_, c)| rejected_by_brokers(c)) else {
        return Ok(());
    };
    let kind = if c.is_control() {
        "a control character"
    } else {
        "a Unicode noncharacter"
    };
    Err(TopicError(format!(
        "must not contain U+{:04X} ({kind}; MQTT brokers refuse it in topics), found at byte {at}",
        u32::from(c)
    )))
}

/// See [`check_topic_text`].
fn rejected_by_brokers(c: char) -> bool {
    let code = u32::from(c);
    // `is_control` is exactly U+0000–U+001F and U+007F–U+009F.
    c.is_control() || (0xFDD0..=0xFDEF).contains(&code) || code & 0xFFFE == 0xFFFE
}

/// The longest level of a topic a device publishes on that is stored, in
/// bytes: a device id's limit, so that a level that may be a device id
/// fits the store's indexes (PostgreSQL's btree refuses rows over ~2.7 kB).
pub const MAX_TOPIC_LEVEL_BYTES: usize = MAX_DEVICE_ID_BYTES;

/// Checks that a topic a message arrived on can be stored and answered:
/// nothing MQTT brokers reject ([`check_topic_text`]: U+0000, which
/// PostgreSQL `text` refuses, and the other control characters), and no
/// level over [`MAX_TOPIC_LEVEL_BYTES`].
pub fn check_received_topic(topic: &str) -> Result<(), TopicError> {
    check_topic_text(topic)?;
    match topic
        .split('/')
        .find(|level| level.len() > MAX_TOPIC_LEVEL_BYTES)
    {
        Some(level) => Err(TopicError(format!(
            "has a level of {} bytes; the limit is {MAX_TOPIC_LEVEL_BYTES}",
            level.len()
        ))),
        None => Ok(()),
    }
}

/// Checks an MQTT topic filter (MQTT 3.1.1 section 4.7): non-empty, at most
/// [`MAX_TOPIC_BYTES`], nothing brokers reject ([`check_topic_text`]), `+`
/// alone in its level, `#` alone in the last level.
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError("must not be empty".into()));
    }
    if filter.len() > MAX_TOPIC_BYTES {
        return Err(TopicError(format!(
            "is {} bytes long; the limit is {MAX_TOPIC_BYTES}",
            filter.len()
        )));
    }
    check_topic_text(filter)?;
    if !rumqttc::valid_filter(filter) {
        return Err(TopicError(
            "'+' and '#' must each fill a whole topic level, and '#' must be the last level".into(),
        ));
    }
    Ok(())
}

/// Whether `topic` (a topic name, no wildcards) matches `filter` (a valid
/// topic filter). Topics starting with `$` are not matched by a leading
/// wildcard, as in MQTT.
///
/// Not `rumqttc::matches`: that one never matches a `$` topic, not even by
/// a filter that names it (`$SYS/#`), while brokers deliver those, and
/// ListReadings must select what the broker sent.
///
/// ```
/// use devicehub::topic::topic_matches;
/// assert!(topic_matches("devices/+/readings", "devices/d1/readings"));
/// assert!(topic_matches("devices/#", "devices/d1/readings/extra"));
/// assert!(!topic_matches("devices/+", "devices/d1/readings"));
/// ```
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// The literal text of `level` in a valid topic `filter`: `None` when that
/// level is `+`, or lies at or after a `#`, or does not exist.
///
/// ```
/// use devicehub::topic::literal_level;
/// assert_eq!(literal_level("devices/d7/#", 1), Some("d7"));
/// assert_eq!(literal_level("devices/+/readings", 1), None);
/// assert_eq!(literal_level("devices/#", 1), None);
/// ```
pub fn literal_level(filter: &str, level: usize) -> Option<&str> {
    let text = filter.split('/').nth(level)?;
    let before_has_hash = filter.split('/').take(level).any(|l| l == "#");
    (!before_has_hash && text != "+" && text != "#").then_some(text)
}

/// A topic with an optional `{device_id}` level, such as
/// `devices/{device_id}/readings`.
///
/// ```
/// use devicehub::topic::TopicTemplate;
/// let readings = TopicTemplate::parse("devices/{device_id}/readings", None).unwrap();
/// assert_eq!(readings.subscription_filter(), "devices/+/readings");
/// assert_eq!(readings.device_id_of("devices/fan-7/readings"), Some("fan-7"));
/// assert_eq!(readings.topic_for("fan-7"), "devices/fan-7/readings");
/// ```
///
/// A readings template may also hold `+` and `#` levels; it is subscribed with
/// the placeholder replaced by `+`. A template without a placeholder stands for
/// one device whose id is configured separately ([`TopicTemplate::fixed_device_id`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    template: String,
    /// Index of the `{device_id}` level, if any.
    placeholder_level: Option<usize>,
    /// The template with the placeholder replaced by `+`.
    subscription: String,
    fixed_device_id: Option<String>,
    has_wildcards: bool,
    /// For a template with a placeholder and no wildcards, the text before
    /// and after the placeholder: matching a topic is then two comparisons
    /// (this runs for every message received).
    affixes: Option<(String, String)>,
}

impl TopicTemplate {
    /// Parses `template`. `fixed_device_id` names the device of a template
    /// without a placeholder and is required for one.
    pub fn parse(template: &str, fixed_device_id: Option<&str>) -> Result<Self, TopicError> {
        let levels: Vec<&str> = template.split('/').collect();
        let mut placeholder_level = None;
        for (i, level) in levels.iter().enumerate() {
            if *level == DEVICE_ID_PLACEHOLDER {
                if placeholder_level.is_some() {
                    return Err(TopicError(format!(
                        "{template:?} holds {DEVICE_ID_PLACEHOLDER} more than once"
                    )));
                }
                placeholder_level = Some(i);
            } else if level.contains(DEVICE_ID_PLACEHOLDER) {
                return Err(TopicError(format!(
                    "{template:?}: {DEVICE_ID_PLACEHOLDER} must be a whole topic level"
                )));
            }
        }
        // Every topic made from the template must fit MQTT's limit, with
        // the longest device id in the placeholder.
        let longest = match placeholder_level {
            Some(_) => template.len() - DEVICE_ID_PLACEHOLDER.len() + MAX_DEVICE_ID_BYTES,
            None => template.len(),
        };
        if longest > MAX_TOPIC_BYTES {
            return Err(TopicError(format!(
                "{template:?} makes topics of up to {longest} bytes; MQTT's limit is {MAX_TOPIC_BYTES}"
            )));
        }
        let subscription = render(&levels, placeholder_level, "+");
        validate_topic_filter(&subscription)
            .map_err(|e| TopicError(format!("{template:?} is not a valid topic: {e}")))?;
        let fixed_device_id = match (placeholder_level, fixed_device_id) {
            (Some(_), _) => None,
            (None, Some(id)) => {
                validate_device_id(id)
                    .map_err(|e| TopicError(format!("the fixed device id {e}")))?;
                Some(id.to_owned())
            }
            (None, None) => {
                return Err(TopicError(format!(
                    "{template:?} has no {DEVICE_ID_PLACEHOLDER} level, so a fixed device id is required"
                )))
            }
        };
        let has_wildcards = levels.iter().any(|l| *l == "+" || *l == "#");
        let affixes = match placeholder_level {
            Some(i) if !has_wildcards => {
                let before: String = levels[..i].iter().map(|l| format!("{l}/")).collect();
                let after: String = levels[i + 1..].iter().map(|l| format!("/{l}")).collect();
                Some((before, after))
            }
            _ => None,
        };
        Ok(Self {
            template: template.to_owned(),
            placeholder_level,
            subscription,
            fixed_device_id,
            has_wildcards,
            affixes,
        })
    }

    /// Which topic level holds the device id, if the template has one.
    pub fn placeholder_level(&self) -> Option<usize> {
        self.placeholder_level
    }

    /// The device id used when the template has no placeholder.
    pub fn fixed_device_id(&self) -> Option<&str> {
        self.fixed_device_id.as_deref()
    }

    /// Whether the template holds `+` or `#` levels (a publish topic must not).
    pub fn has_wildcards(&self) -> bool {
        self.has_wildcards
    }

    /// The filter to subscribe to: the placeholder replaced by `+`.
    pub fn subscription_filter(&self) -> &str {
        &self.subscription
    }

    /// The topic for `device_id`, which the caller has validated.
    pub fn topic_for(&self, device_id: &str) -> String {
        let levels: Vec<&str> = self.template.split('/').collect();
        render(&levels, self.placeholder_level, device_id)
    }

    /// The device id that `topic` carries, or `None` when the topic does not
    /// follow this template.
    pub fn device_id_of<'t>(&'t self, topic: &'t str) -> Option<&'t str> {
        if let Some((before, after)) = &self.affixes {
            let id = topic
                .strip_prefix(before.as_str())?
                .strip_suffix(after.as_str())?;
            // `+` never matches a first level that starts with `$`.
            let first_level_system = before.is_empty() && id.starts_with('$');
            let valid = !id.is_empty() && !id.contains('/') && !first_level_system;
            return valid.then_some(id);
        }
        self.device_id_by_levels(topic)
    }

    /// [`TopicTemplate::device_id_of`] for any template, level by level.
    fn device_id_by_levels<'t>(&'t self, topic: &'t str) -> Option<&'t str> {
        let filter_matches = || topic_matches(&self.subscription, topic);
        match self.placeholder_level {
            None => filter_matches().then_some(self.fixed_device_id.as_deref()?),
            Some(i) => {
                let id = topic.split('/').nth(i)?;
                (!id.is_empty() && filter_matches()).then_some(id)
            }
        }
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.template)
    }
}

fn render(levels: &[&str], placeholder_level: Option<usize>, value: &str) -> String {
    let mut out = String::new();
    for (i, level) in levels.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(if Some(i) == placeholder_level {
            value
        } else {
            level
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_topics() {
        assert!(check_received_topic("devices/sensor-1/readings").is_ok());
        let longest = format!("devices/{}/readings", "x".repeat(MAX_TOPIC_LEVEL_BYTES));
        assert!(check_received_topic(&longest).is_ok());
        let error = check_received_topic(&format!("devices/{}x/readings", "x".repeat(256)))
            .unwrap_err()
            .to_string();
        assert_eq!(error, "has a level of 257 bytes; the limit is 256");
        assert!(check_received_topic("devices/a\0b/readings").is_err());
        assert!(check_received_topic("devices/a\u{7}b/readings").is_err());
    }

    #[test]
    fn device_ids() {
        assert!(validate_device_id("sensor-1").is_ok());
        for bad in ["", "a/b", "a+", "#", "a\0b"] {
            assert!(validate_device_id(bad).is_err(), "{bad:?}");
        }
        // Every character MQTT receivers reject, at the edges of each range.
        for c in [
            0x00, 0x01, 0x1F, 0x7F, 0x80, 0x9F, 0xFDD0, 0xFDEF, 0xFFFE, 0xFFFF, 0x1FFFE, 0x1FFFF,
            0x10FFFE, 0x10FFFF,
        ] {
            let c = char::from_u32(c).unwrap();
            let error = validate_device_id(&format!("a{c}"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("U+{:04X}", u32::from(c))) && error.contains("byte 1"),
                "{error}"
            );
            assert!(validate_topic_filter(&format!("a/{c}/#")).is_err());
            assert!(TopicTemplate::parse(&format!("a{c}/{{device_id}}"), None).is_err());
        }
        // Their neighbours are fine.
        for c in [0x20, 0x7E, 0xA0, 0xFDCF, 0xFDF0, 0xFFFD, 0x1FFFD, 0x10000] {
            let id = format!("a{}", char::from_u32(c).unwrap());
            assert!(validate_device_id(&id).is_ok(), "U+{c:04X}");
        }
        assert!(validate_device_id(&"x".repeat(MAX_DEVICE_ID_BYTES + 1)).is_err());
    }

    #[test]
    fn filters() {
        for good in ["#", "+", "a/+/c", "a/#", "+/+", "/"] {
            assert!(validate_topic_filter(good).is_ok(), "{good:?}");
        }
        for bad in ["", "a#", "a/#/c", "a+/b", "a/b\0"] {
            assert!(validate_topic_filter(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching() {
        assert!(topic_matches("devices/+/readings", "devices/d1/readings"));
        assert!(!topic_matches("devices/+/readings", "devices/d1/other"));
        assert!(!topic_matches(
            "devices/+/readings",
            "devices/d1/readings/x"
        ));
        assert!(topic_matches("devices/#", "devices/d1/readings"));
        assert!(topic_matches("devices/#", "devices"));
        assert!(topic_matches("#", "a/b"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("a/b", "a"));
    }

    #[test]
    fn templates() {
        let t = TopicTemplate::parse("devices/{device_id}/readings", None).unwrap();
        assert_eq!(t.subscription_filter(), "devices/+/readings");
        assert_eq!(t.topic_for("d1"), "devices/d1/readings");
        assert_eq!(t.device_id_of("devices/d1/readings"), Some("d1"));
        assert_eq!(t.device_id_of("devices/d1/readings/x"), None);
        assert_eq!(t.device_id_of("devices/a/b/readings"), None);
        assert_eq!(t.device_id_of("devices/readings"), None);
        assert_eq!(t.device_id_of("devices//readings"), None);
        assert_eq!(t.device_id_of("other/d1/readings"), None);

        let wild = TopicTemplate::parse("site/+/{device_id}/#", None).unwrap();
        assert!(wild.has_wildcards());
        assert_eq!(wild.device_id_of("site/a/d2/t/h"), Some("d2"));

        let fixed = TopicTemplate::parse("poc/device/sensor", Some("device")).unwrap();
        assert_eq!(fixed.subscription_filter(), "poc/device/sensor");
        assert_eq!(fixed.topic_for("ignored"), "poc/device/sensor");
        assert_eq!(fixed.device_id_of("poc/device/sensor"), Some("device"));
        assert_eq!(fixed.device_id_of("poc/device/other"), None);

        assert!(TopicTemplate::parse("poc/device/sensor", None).is_err());
        assert!(TopicTemplate::parse("a/x{device_id}", None).is_err());
        assert!(TopicTemplate::parse("{device_id}/{device_id}", None).is_err());
        assert!(TopicTemplate::parse("a/#/{device_id}", None).is_err());
        assert!(TopicTemplate::parse("poc/device/sensor", Some("a\u{1}")).is_err());
        let long_prefix = "p".repeat(MAX_TOPIC_BYTES - MAX_DEVICE_ID_BYTES);
        assert!(TopicTemplate::parse(&format!("{long_prefix}/{{device_id}}"), None).is_err());
        assert!(
            TopicTemplate::parse(&format!("{}/{{device_id}}", &long_prefix[1..]), None).is_ok()
        );
    }

    #[test]
    fn fast_device_id_agrees_with_matching_level_by_level() {
        let templates = [
            "devices/{device_id}/readings",
            "{device_id}/readings",
            "devices/{device_id}",
            "{device_id}",
            "a/b/{device_id}/c/d",
        ];
        let topics = [
            "devices/d1/readings",
            "devices//readings",
            "devices/d1/readings/",
            "devices/d1",
            "devices/d1/",
            "devices/",
            "d1/readings",
            "$SYS/readings",
            "$d/readings",
            "d$/readings",
            "/readings",
            "readings",
            "d1",
            "$d1",
            "",
            "/",
            "a/b/x/c/d",
            "a/b//c/d",
            "a/b/x/y/c/d",
            "a/b/x/c",
            "devices/$d/readings",
            "devicesX/d1/readings",
            "devices/d1/readingsX",
        ];
        for template in templates {
            let t = TopicTemplate::parse(template, None).unwrap();
            assert!(t.affixes.is_some(), "{template}");
            for topic in topics {
                assert_eq!(
                    t.device_id_of(topic),
                    t.device_id_by_levels(topic),
                    "{template} vs {topic}"
                );
            }
        }
    }
}
