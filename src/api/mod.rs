//! gRPC adapters, one file per service: validate, convert (`crate::convert`), call
//! the resource's service (the engine, `projects`, `assets`), convert back.
use crate::domain::page;

pub mod acquire;
pub mod assets;
pub mod jobs;
pub mod projects;
pub mod queues;
pub mod session;

/// Room a list response keeps besides its items: the next page token and the framing.
const PAGE_HEADROOM: usize = 4 * 1024;

/// The bytes of items a list response may hold under the encoder's message limit.
pub(crate) fn page_budget(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_sub(PAGE_HEADROOM)
}

/// How many of `items`, in order, one response holds within `budget` bytes: at least
/// one (an item alone past the limit is refused by the encoder, as it would be by Get).
pub(crate) fn fitting<T: prost::Message>(items: &[T], budget: usize) -> usize {
    let mut used = 0;
    for (i, item) in items.iter().enumerate() {
        // As a repeated message field encodes it: tag, length, message.
        used += prost::encoding::message::encoded_len(1, item);
        if used > budget {
            return i.max(1);
        }
    }
    items.len()
}

/// One list page as it is sent: `rows` converted, cut before the item that would take
/// the response past `budget` bytes (AIP-158 lets a page hold fewer than `page_size`;
/// uncut, a page of jobs with large inputs was refused whole by the encoder), with the
/// cursor of the last row sent and whether rows were left out.
pub(crate) fn fit_page<R, T: prost::Message + From<R>>(
    rows: Vec<R>,
    budget: usize,
    cursor: impl Fn(&R) -> page::Cursor,
) -> (Vec<T>, Option<page::Cursor>, bool) {
    let cursors: Vec<page::Cursor> = rows.iter().map(cursor).collect();
    let mut items: Vec<T> = rows.into_iter().map(T::from).collect();
    let n = fitting(&items, budget);
    let cut = n < items.len();
    items.truncate(n);
    let last = n.checked_sub(1).and_then(|i| cursors.get(i).copied());
    (items, last, cut)
}
