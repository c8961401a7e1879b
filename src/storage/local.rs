//! Asset bytes on a local disk: uploads written and downloads read with direct I/O
//! where the filesystem allows it, through the page cache otherwise.
//!
//! Measured on this service's machines (virtual, where every freshly allocated page is
//! expensive): writes through the page cache copied each byte into it at about 400 MB/s
//! per core, 70% of an upload's server CPU; direct I/O from one reused aligned buffer
//! skips that copy (uploads 0.17x → 0.52x a durable copy, `cargo bench --bench assets`).
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use futures::Stream;

use super::StorageError;

/// `range` of a local file in `chunk`-sized pieces, the next read while this one is sent.
pub(super) fn file_chunks(
    file: std::fs::File,
    path: &std::path::Path,
    range: Range<u64>,
    chunk: usize,
) -> impl Stream<Item = Result<Bytes, StorageError>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, StorageError>>(2);
    let chunk = chunk.max(1);
    let direct = open_direct(path);
    tokio::task::spawn_blocking(move || {
        let fail = |e: std::io::Error| StorageError(format!("reading stored bytes: {e}"));
        // Chunks are cut from one buffer that is reused once the chunks cut from it
        // are gone (they are encoded, copied, and dropped within a message or two):
        // a fresh zeroed 1 MiB per chunk cost a page fault per 4 KiB.
        let mut pool = BytesMut::new();
        let mut cut = |bytes: &[u8]| -> Bytes {
            if pool.capacity() < bytes.len() {
                pool.reserve(READ_POOL.max(bytes.len()));
            }
            pool.extend_from_slice(bytes);
            pool.split().freeze()
        };
        match direct {
            // Direct reads into one aligned buffer, 4 MiB at a time: uploads are written
            // past the page cache, and reading them back through it allocates a fresh
            // page per 4 KiB (the cost `create_for_upload` measured).
            Some(direct) => {
                let mut raw = Vec::new();
                let buf = aligned(&mut raw);
                let mut at = range.start;
                while at < range.end {
                    let block = at - at % DIRECT_ALIGN as u64;
                    let n = match read_at_most(&direct, buf, block) {
                        Ok(0) => {
                            let _ = tx
                                .blocking_send(Err(fail(std::io::ErrorKind::UnexpectedEof.into())));
                            return;
                        }
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(fail(e)));
                            return;
                        }
                    };
                    let valid = &buf[(at - block) as usize..n.min((range.end - block) as usize)];
                    for piece in valid.chunks(chunk) {
                        if tx.blocking_send(Ok(cut(piece))).is_err() {
                            return;
                        }
                    }
                    at += valid.len() as u64;
                }
            }
            None => {
                use std::os::unix::fs::FileExt;
                advise_sequential(&file, range.start, range.end - range.start);
                let mut scratch = vec![0u8; chunk];
                let mut at = range.start;
                while at < range.end {
                    let len = (range.end - at).min(chunk as u64) as usize;
                    let read = file
                        .read_exact_at(&mut scratch[..len], at)
                        .map(|()| cut(&scratch[..len]))
                        .map_err(fail);
                    let failed = read.is_err();
                    if tx.blocking_send(read).is_err() || failed {
                        return;
                    }
                    at += len as u64;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The stored file opened for direct reads, where the filesystem allows it.
fn open_direct(path: &std::path::Path) -> Option<std::fs::File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Reads up to `buf.len()` bytes at `offset` (fewer only at the end of the file).
fn read_at_most(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        // A direct read that stops short of a block boundary has reached the end.
        if filled % DIRECT_ALIGN != 0 {
            break;
        }
    }
    Ok(filled)
}

/// The reusable read buffer of a download.
const READ_POOL: usize = 8 * 1024 * 1024;

/// Tells the kernel a download reads `len` bytes from `offset` in order (a larger
/// readahead window).
#[cfg(target_os = "linux")]
fn advise_sequential(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; advice only.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_SEQUENTIAL,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_sequential(_file: &std::fs::File, _offset: u64, _len: u64) {}

/// Bytes handed to a local writer before it starts their writeback.
const WRITEBACK_EVERY: u64 = 8 * 1024 * 1024;

/// A local upload, written in place at its key by a blocking thread (the key is only
/// read once the asset is READY, and the collector's queue holds it until then, so a
/// crash leaves nothing behind). Written with direct I/O where the filesystem allows
/// (`write_direct`); otherwise through the page cache with writeback started every few
/// MiB (`sync_file_range`), so the fsync that makes the upload durable finds little
/// left to write. Either way the upload is acknowledged after an fsync.
pub struct LocalWriter {
    chunks: Option<tokio::sync::mpsc::Sender<Bytes>>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
    path: std::path::PathBuf,
    /// Finished or aborted; dropped otherwise (the call went away) removes the file.
    settled: bool,
}

impl LocalWriter {
    pub(super) fn start(path: std::path::PathBuf) -> Result<Self, StorageError> {
        let fail = |e: std::io::Error| StorageError(format!("writing {}: {e}", path.display()));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(fail)?;
        }
        let (file, direct) = create_for_upload(&path).map_err(fail)?;
        let (chunks, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let dir = path.parent().map(std::path::Path::to_path_buf);
        let writer = tokio::task::spawn_blocking(move || {
            let file = if direct {
                write_direct(file, &mut rx)?
            } else {
                write_buffered(file, &mut rx)?
            };
            file.sync_all()?;
            // The directory entry too, or a crash could lose the file itself.
            if let Some(dir) = dir {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        });
        Ok(Self {
            chunks: Some(chunks),
            writer,
            path,
            settled: false,
        })
    }

    pub(super) async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        let sent = match &self.chunks {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer stopped early: its error says why.
        self.chunks = None;
        Err(match (&mut self.writer).await {
            Ok(Err(e)) => StorageError(format!("writing {}: {e}", self.path.display())),
            _ => StorageError("upload writer stopped".into()),
        })
    }

    pub(super) async fn finish(mut self) -> Result<(), StorageError> {
        drop(self.chunks.take());
        self.settled = true;
        match (&mut self.writer).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StorageError(format!(
                "writing {}: {e}",
                self.path.display()
            ))),
            Err(e) => Err(StorageError(format!("upload writer: {e}"))),
        }
    }

    pub(super) async fn abort(mut self) {
        if let Some(removal) = self.discard() {
            let _ = removal.await;
        }
    }

    /// Stops the writer and removes the file on a blocking thread, which finishes even
    /// when the call awaiting it is dropped (hyper drops a handler whose stream is reset).
    fn discard(&mut self) -> Option<tokio::task::JoinHandle<std::io::Result<()>>> {
        if std::mem::replace(&mut self.settled, true) {
            return None;
        }
        drop(self.chunks.take());
        let path = std::mem::take(&mut self.path);
        tokio::runtime::Handle::try_current()
            .ok()
            .map(|rt| rt.spawn_blocking(move || std::fs::remove_file(path)))
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        self.discard();
    }
}

/// Alignment of direct I/O: buffer addresses, lengths and file offsets (a multiple of
/// every logical block size in use, 512 or 4096).
const DIRECT_ALIGN: usize = 4096;
/// Bytes per direct write.
const DIRECT_BUFFER: usize = 4 * 1024 * 1024;

/// A `DIRECT_BUFFER`-byte window of `raw` (which it allocates) aligned for direct I/O:
/// an aligned window into a plain allocation, with no unsafe code for the alignment.
fn aligned(raw: &mut Vec<u8>) -> &mut [u8] {
    *raw = vec![0u8; DIRECT_BUFFER + DIRECT_ALIGN];
    let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
    &mut raw[start..start + DIRECT_BUFFER]
}

/// Creates an upload's file, for direct I/O where the filesystem allows it (`true`).
/// Measured on this service's machines: writes through the page cache copy every byte
/// into it at about 1 GB/s of CPU, and an upload spent 70% of its server CPU there;
/// direct writes from one reused aligned buffer skip that copy and the writeback after it.
fn create_for_upload(path: &std::path::Path) -> std::io::Result<(std::fs::File, bool)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => return Ok((file, true)),
            // tmpfs and some others refuse O_DIRECT.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((std::fs::File::create(path)?, false))
}

/// Writes the chunks through the page cache, starting writeback every few MiB.
fn write_buffered(
    mut file: std::fs::File,
    rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    let (mut written, mut flushed) = (0u64, 0u64);
    while let Some(chunk) = rx.blocking_recv() {
        file.write_all(&chunk)?;
        written += chunk.len() as u64;
        if written - flushed >= WRITEBACK_EVERY {
            start_writeback(&file, flushed, written - flushed);
            flushed = written;
        }
    }
    Ok(file)
}

/// Writes the chunks with direct I/O: gathered into one aligned buffer (a copy within
/// this process's own warm memory) and written a full buffer at a time; the last
/// partial block is written padded and the file cut back to its size.
fn write_direct(
    mut file: std::fs::File,
    rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    let mut raw = Vec::new();
    let buf = aligned(&mut raw);
    let (mut filled, mut total) = (0usize, 0u64);
    while let Some(chunk) = rx.blocking_recv() {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let n = rest.len().min(DIRECT_BUFFER - filled);
            buf[filled..filled + n].copy_from_slice(&rest[..n]);
            filled += n;
            rest = &rest[n..];
            if filled == DIRECT_BUFFER {
                file.write_all(buf)?;
                total += DIRECT_BUFFER as u64;
                filled = 0;
            }
        }
    }
    if filled > 0 {
        let padded = filled.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        buf[filled..padded].fill(0);
        file.write_all(&buf[..padded])?;
        total += filled as u64;
        file.set_len(total)?;
    }
    Ok(file)
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk, without waiting.
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call only schedules I/O for its pages.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Elsewhere the closing fsync does all the writing.
#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) {}
