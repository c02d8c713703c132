//! The byte form of a completed record, for stores that keep bytes: postcard, with the format
//! version checked on the way back.

use super::{CompletedRecord, RECORD_FORMAT_VERSION};
use crate::StoreError;

/// The record's bytes.
pub(super) fn encode_record(record: &CompletedRecord) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(record).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The record these bytes hold, if they are one this version can read.
pub(super) fn decode_record(bytes: &[u8]) -> Result<CompletedRecord, StoreError> {
    let record: CompletedRecord =
        postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if record.version != RECORD_FORMAT_VERSION {
        return Err(StoreError::Corrupt(format!(
            "record format version {} is not {RECORD_FORMAT_VERSION}",
            record.version,
        )));
    }
    Ok(record)
}
