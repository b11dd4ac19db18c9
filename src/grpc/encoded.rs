//! A reading's message as every response that carries it has it.
//!
//! Encoding a reading (its JSON payload transcoded to a protobuf `Value`)
//! costs microseconds; with N watchers on the same readings, doing it per
//! stream made the work grow with readings × watchers. So the first
//! response to need a reading's message keeps it in the hub's ring of the
//! newest readings (`hub/live.rs`) and every other response copies it.
//!
//! What is kept is a reading encoded as field 1 of its message: that is at
//! once a whole `WatchReadingsResponse` (field 1 is its `reading`) and one
//! entry of `ListReadingsResponse.readings` (field 1 too), so listing the
//! newest readings uses the same messages.

use super::wire::put_reading_field;
use crate::buffer::Reading;

/// The field number of a reading in both `WatchReadingsResponse` (`reading`)
/// and `ListReadingsResponse` (`readings`).
pub const READING_FIELD: u32 = 1;

/// Appends `reading` encoded as field [`READING_FIELD`] to `out`.
pub fn encode_reading(reading: &Reading, out: &mut Vec<u8>) {
    put_reading_field(READING_FIELD, reading, out);
}
