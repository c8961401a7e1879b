//! gRPC adapters, one file per service: validate, convert, call the domain and the
//! database, convert back.
use tonic::Status;

use crate::{AppError, db, domain::page};

pub mod assets;
pub mod convert;
pub mod jobs;
pub mod projects;

/// A pooled connection, or UNAVAILABLE when Postgres cannot be reached in time.
pub(crate) async fn conn(pool: &db::Pool) -> Result<db::PooledConn<'_>, Status> {
    pool.get()
        .await
        .map_err(|e| Status::from(AppError::from(e)))
}

/// Room a list response keeps besides its items: the next page token and the framing.
const PAGE_HEADROOM: usize = 4 * 1024;

/// The bytes of items a list response may hold under the encoder's message limit.
pub(crate) fn page_budget(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_sub(PAGE_HEADROOM)
}

/// One list page as it is sent: `rows` converted, cut before the item that would take
/// the response past `budget` bytes (AIP-158 lets a page hold fewer than `page_size`;
/// uncut, a page of jobs with large inputs was refused whole by the encoder), with the
/// cursor of the last row sent and whether rows were left out. The first row is always
/// sent: a row alone past the limit is refused by the encoder, as it would be by Get.
pub(crate) fn fit_page<R, T: prost::Message + From<R>>(
    rows: Vec<R>,
    budget: usize,
    cursor: impl Fn(&R) -> page::Cursor,
) -> (Vec<T>, Option<page::Cursor>, bool) {
    let mut items = Vec::with_capacity(rows.len());
    let (mut used, mut last) = (0, None);
    for row in rows {
        let at = cursor(&row);
        let item = T::from(row);
        // As a repeated message field encodes it: tag, length, message.
        let size = prost::encoding::message::encoded_len(1, &item);
        if !items.is_empty() && used + size > budget {
            return (items, last, true);
        }
        used += size;
        items.push(item);
        last = Some(at);
    }
    (items, last, false)
}
