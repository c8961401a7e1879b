//! Asset bytes on a local disk: uploads written and downloads read with direct I/O
//! where the filesystem allows it, through the page cache otherwise.
//!
//! Measured on this service's machines (virtual, where every freshly allocated page is
//! expensive): writes through the page cache copied each byte into it at about 400 MB/s
//! per core, 70% of an upload's server CPU; direct I/O from one reused aligned buffer
//! skips that copy (uploads 0.17x → 0.52x a durable copy, `cargo bench --bench assets`).
use std::ops::Range;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::StorageError;

/// `range` of a local file in `chunk`-sized pieces. A blocking thread reads ahead a
/// block at a time into a few reused aligned buffers, and the pieces are cut from those
/// buffers without a copy (a buffer is reused once its last piece is dropped, after
/// the piece is encoded into its message).
///
/// Each block is read from the page cache when it is all there, and
/// otherwise with direct I/O, which does not fill the cache: measured on this service's
/// machines, a cold read through the page cache ran at a third of a direct read (every
/// fresh cache page is expensive), while a cached read is an order of magnitude faster
/// than either. So a hot asset is served from memory and a cold one at disk speed.
pub(super) fn file_chunks(
    file: std::fs::File,
    path: &std::path::Path,
    range: Range<u64>,
    chunk: usize,
) -> impl Stream<Item = Result<Bytes, StorageError>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, StorageError>>(READ_AHEAD - 1);
    let chunk = chunk.max(1);
    let direct = open_direct(path);
    tokio::task::spawn_blocking(move || read_blocks(&file, direct.as_ref(), range, &tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(move |block| {
            let pieces: Vec<_> = match block {
                Ok(block) => (0..block.len())
                    .step_by(chunk)
                    .map(|at| Ok(block.slice(at..(at + chunk).min(block.len()))))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(pieces)
        })
        .flatten()
}

/// Reads `range` a block at a time and sends each block, until done, failed or the
/// receiver is gone.
fn read_blocks(
    file: &std::fs::File,
    direct: Option<&std::fs::File>,
    range: Range<u64>,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, StorageError>>,
) {
    let fail = |e: std::io::Error| StorageError(format!("reading stored bytes: {e}"));
    if direct.is_none() {
        advise_sequential(file, range.start, range.end - range.start);
    }
    let mut pool = BlockPool::new();
    let mut at = range.start;
    while at < range.end {
        let Some(mut raw) = pool.take(tx) else {
            return; // the download went away
        };
        let window = aligned_window(&raw);
        let buf = &mut raw[window.clone()];
        let want = (range.end - at).min(DIRECT_BUFFER as u64) as usize;
        let read = match read_cached(file, &mut buf[..want], at) {
            Some(n) => Ok((0, n)),
            None => match direct {
                Some(direct) => {
                    let block = at - at % DIRECT_ALIGN as u64;
                    read_at_most(direct, buf, block).map(|n| {
                        let skip = (at - block) as usize;
                        (
                            skip,
                            n.min((range.end - block) as usize).saturating_sub(skip),
                        )
                    })
                }
                None => {
                    use std::os::unix::fs::FileExt;
                    file.read_at(&mut buf[..want], at).map(|n| (0, n))
                }
            },
        };
        let block = match read {
            Ok((_, 0)) => Err(fail(std::io::ErrorKind::UnexpectedEof.into())),
            Ok((skip, n)) => {
                at += n as u64;
                let start = window.start + skip;
                Ok(Bytes::from_owner(PooledBlock {
                    raw,
                    valid: start..start + n,
                    home: pool.home.clone(),
                }))
            }
            Err(e) => Err(fail(e)),
        };
        let failed = block.is_err();
        if tx.blocking_send(block).is_err() || failed {
            return;
        }
    }
}

/// Read buffers in flight per download: one being read, the rest sent or being sent.
const READ_AHEAD: usize = 3;

/// A download's read buffers: at most `READ_AHEAD`, each back in the pool once the
/// last piece cut from it is dropped.
struct BlockPool {
    home: std::sync::mpsc::Sender<Vec<u8>>,
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    made: usize,
}

impl BlockPool {
    fn new() -> Self {
        let (home, free) = std::sync::mpsc::channel();
        Self {
            home,
            free,
            made: 0,
        }
    }

    /// A free buffer, waiting for one while the download is still wanted.
    fn take<T>(&mut self, tx: &tokio::sync::mpsc::Sender<T>) -> Option<Vec<u8>> {
        if let Ok(raw) = self.free.try_recv() {
            return Some(raw);
        }
        if self.made < READ_AHEAD {
            self.made += 1;
            return Some(vec![0u8; DIRECT_BUFFER + DIRECT_ALIGN]);
        }
        loop {
            match self.free.recv_timeout(std::time::Duration::from_secs(1)) {
                Ok(raw) => return Some(raw),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !tx.is_closed() => {}
                Err(_) => return None,
            }
        }
    }
}

/// Bytes read into a pooled buffer; dropping it returns the buffer to its pool.
struct PooledBlock {
    raw: Vec<u8>,
    valid: Range<usize>,
    home: std::sync::mpsc::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for PooledBlock {
    fn as_ref(&self) -> &[u8] {
        &self.raw[self.valid.clone()]
    }
}

impl Drop for PooledBlock {
    fn drop(&mut self) {
        // The pool may be gone (the download finished); the buffer is then freed.
        let _ = self.home.send(std::mem::take(&mut self.raw));
    }
}

/// Reads `buf.len()` bytes at `offset` only if the page cache holds them all; `None`
/// otherwise. Residency is asked with `mincore` on a mapping that is never touched,
/// which does no I/O: a no-wait read (`RWF_NOWAIT`) would start readahead into the
/// cache on a miss, and measured, that halved the speed of a cold download.
#[cfg(target_os = "linux")]
fn read_cached(file: &std::fs::File, buf: &mut [u8], offset: u64) -> Option<usize> {
    use std::os::{fd::AsRawFd, unix::fs::FileExt};
    if buf.is_empty() {
        return None;
    }
    let page = DIRECT_ALIGN as u64;
    let start = offset - offset % page;
    let span = (offset + buf.len() as u64 - start) as usize;
    let mut resident = vec![0u8; span.div_ceil(DIRECT_ALIGN)];
    // SAFETY: a read-only shared mapping of an open file that is only passed to
    // `mincore` (never read through) and unmapped before returning; `resident` has one
    // byte per page of it, as `mincore` requires.
    let all = unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start as libc::off_t,
        );
        if map == libc::MAP_FAILED {
            return None;
        }
        let asked = libc::mincore(map, span, resident.as_mut_ptr());
        libc::munmap(map, span);
        asked == 0 && resident.iter().all(|page| page & 1 == 1)
    };
    if !all {
        return None;
    }
    file.read_exact_at(buf, offset).ok().map(|()| buf.len())
}

#[cfg(not(target_os = "linux"))]
fn read_cached(_file: &std::fs::File, _buf: &mut [u8], _offset: u64) -> Option<usize> {
    None
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

/// Chunks queued for a local writer (each holding its receive buffer until copied).
const WRITE_QUEUE: usize = 2;

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
        let (chunks, mut rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
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
    let window = aligned_window(raw);
    &mut raw[window]
}

/// Where the aligned `DIRECT_BUFFER` bytes lie in a `DIRECT_BUFFER + DIRECT_ALIGN` one.
fn aligned_window(raw: &[u8]) -> Range<usize> {
    let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
    start..start + DIRECT_BUFFER
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

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    /// A file of `len` bytes whose every byte differs from its neighbours'.
    fn sample(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object");
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        (dir, path, bytes)
    }

    async fn read(path: &std::path::Path, range: Range<u64>, chunk: usize) -> Vec<Bytes> {
        let file = std::fs::File::open(path).unwrap();
        file_chunks(file, path, range, chunk)
            .map(|c| c.unwrap())
            .collect()
            .await
    }

    /// Drops the file's pages from the page cache (clean pages only, so after an fsync).
    fn evict(path: &std::path::Path) {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: a valid open descriptor; advice only.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    fn resident(path: &std::path::Path, len: usize) -> bool {
        let file = std::fs::File::open(path).unwrap();
        read_cached(&file, &mut vec![0u8; len], 0).is_some()
    }

    #[tokio::test]
    async fn ranges_come_back_in_chunks_from_the_cache_and_from_the_disk() {
        let len = 2 * DIRECT_BUFFER + 12_345;
        let (_dir, path, bytes) = sample(len);
        let ranges = [
            0..len as u64,
            1..len as u64 - 1,
            4095..4097,
            DIRECT_BUFFER as u64 - 7..DIRECT_BUFFER as u64 + 5_000,
            len as u64 - 3..len as u64,
        ];
        for cached in [true, false] {
            for range in ranges.clone() {
                if cached {
                    std::fs::read(&path).unwrap();
                } else {
                    evict(&path);
                }
                let chunk = 1_000_003;
                let pieces = read(&path, range.clone(), chunk).await;
                assert!(pieces.iter().all(|p| !p.is_empty() && p.len() <= chunk));
                let got: Vec<u8> = pieces.concat();
                assert_eq!(
                    got,
                    &bytes[range.start as usize..range.end as usize],
                    "range {range:?}, cached {cached}"
                );
            }
        }
    }

    #[test]
    fn only_a_range_wholly_in_the_page_cache_counts_as_cached() {
        let (_dir, path, _) = sample(3 * DIRECT_ALIGN);
        std::fs::read(&path).unwrap();
        assert!(resident(&path, 3 * DIRECT_ALIGN));
        evict(&path);
        // The filesystem may keep nothing cached after the advice, or (tmpfs) everything.
        let tmpfs = resident(&path, DIRECT_ALIGN);
        if !tmpfs {
            assert!(!resident(&path, 3 * DIRECT_ALIGN));
        }
    }

    #[tokio::test]
    async fn a_piece_held_after_its_download_went_away_keeps_its_bytes() {
        let (_dir, path, bytes) = sample(4 * DIRECT_BUFFER);
        let file = std::fs::File::open(&path).unwrap();
        let mut stream = Box::pin(file_chunks(
            file,
            &path,
            0..4 * DIRECT_BUFFER as u64,
            1 << 20,
        ));
        let first = stream.next().await.unwrap().unwrap();
        drop(stream);
        // Its buffer may go back to the reader's pool only once this piece is dropped.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(&first[..], &bytes[..1 << 20]);
    }

    /// Feeds `chunks` to `write_direct` as an upload's stream would.
    fn write_chunks(file: std::fs::File, chunks: Vec<Bytes>) -> std::io::Result<std::fs::File> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(chunks.len().max(1));
        for chunk in chunks {
            tx.try_send(chunk).unwrap();
        }
        drop(tx);
        write_direct(file, &mut rx)
    }

    #[test]
    fn direct_writes_across_buffers_keep_every_byte_and_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upload");
        // Several buffers' worth, chunks that straddle them, a partial last block.
        let len = 5 * DIRECT_BUFFER + 12_345;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let chunks = bytes
            .chunks(1_000_003)
            .map(Bytes::copy_from_slice)
            .collect();
        // Direct where the filesystem allows (the writes are aligned either way).
        let (file, _) = create_for_upload(&path).unwrap();
        let file = write_chunks(file, chunks).unwrap();
        file.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn a_failed_direct_write_is_the_uploads_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upload");
        std::fs::write(&path, b"").unwrap();
        // Opened for reading only: every write fails.
        let file = std::fs::File::open(&path).unwrap();
        let chunks = (0..5)
            .map(|_| Bytes::from(vec![7u8; DIRECT_BUFFER]))
            .collect();
        assert!(write_chunks(file, chunks).is_err());
    }
}
