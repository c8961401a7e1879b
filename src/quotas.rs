//! Quotas per owner: projects, jobs not yet finished, and asset bytes (uploads in
//! progress included). Counts come from Postgres, so every instance enforces the same
//! truth; an owner's count is read at most once a second per instance and the
//! admissions made since are added to it, so a busy owner's creates cost no count each.
//! Below half the limit, a count a few seconds old still admits (admissions only add to
//! it, so it can only overstate this instance's share) while one fresh count runs in
//! the background: a busy owner's calls never wait for a count, and never start one
//! each. Measured: a count walks the index entries every finished job leaves until
//! vacuum, and with every waiting create starting its own once a second they were a
//! sixth of a loaded Postgres's time. A call is refused only after a fresh count: a
//! refusal is always exact at that moment. Creates racing on several instances may pass
//! together (at most a second's worth near the limit); the storage quota is exact
//! (checked under a lock in the transaction that makes bytes count).
//!
//! Admins are not held to quotas: they act for other owners.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{AppError, AppResult, config, db};

/// A count read this recently is reused (with the admissions since added to it).
const FRESH: Duration = Duration::from_secs(1);
/// A count older than `FRESH` still admits while a fresh one runs in the background,
/// up to this age (an owner idle longer waits for a count).
const STALE: Duration = Duration::from_secs(5);
/// Owners remembered per quota; when full the cache starts over.
const CAPACITY: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quota {
    Projects,
    ActiveJobs,
    StorageBytes,
}

impl Quota {
    pub const ALL: [Quota; 3] = [Quota::Projects, Quota::ActiveJobs, Quota::StorageBytes];

    /// The name clients see in `QuotaFailure` and in GetUsage.
    pub fn name(self) -> &'static str {
        match self {
            Quota::Projects => "projects",
            Quota::ActiveJobs => "active_jobs",
            Quota::StorageBytes => "storage_bytes",
        }
    }
}

struct Entry {
    read_at: Instant,
    used: i64,
    /// A background count is running; the admissions made since it started, which
    /// it may not have seen, are added to its result.
    refreshing: Option<i64>,
}

#[derive(Clone)]
pub struct Quotas {
    db: db::Pool,
    limits: config::Quotas,
    counted: Arc<Mutex<HashMap<(Quota, String), Entry>>>,
    /// Bytes of uploads in progress on this instance, by owner.
    uploading: Arc<Mutex<HashMap<String, i64>>>,
}

impl Quotas {
    pub fn new(db: db::Pool, limits: config::Quotas) -> Self {
        Self {
            db,
            limits,
            counted: Arc::default(),
            uploading: Arc::default(),
        }
    }

    pub fn limit(&self, quota: Quota) -> i64 {
        match quota {
            Quota::Projects => self.limits.projects,
            Quota::ActiveJobs => self.limits.active_jobs,
            Quota::StorageBytes => self.limits.storage_bytes,
        }
    }

    /// Counts `n` more of `quota` for `owner`, or refuses with QuotaFailure.
    pub async fn admit(&self, quota: Quota, owner: &str, n: i64) -> AppResult<()> {
        let limit = self.limit(quota);
        if self.admit_cached(quota, owner, n, limit) {
            return Ok(());
        }
        let used = self.count(quota, owner).await?;
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        if counted.len() >= CAPACITY {
            counted.clear();
        }
        let admitted = used.saturating_add(n) <= limit;
        counted.insert(
            (quota, owner.to_owned()),
            Entry {
                read_at: Instant::now(),
                used: if admitted { used + n } else { used },
                refreshing: None,
            },
        );
        if admitted {
            Ok(())
        } else {
            Err(exceeded(quota, limit, used))
        }
    }

    fn admit_cached(&self, quota: Quota, owner: &str, n: i64, limit: i64) -> bool {
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = counted.get_mut(&(quota, owner.to_owned())) else {
            return false;
        };
        let used = e.used.saturating_add(n);
        let age = e.read_at.elapsed();
        // Past half the limit a count over a second old is not trusted: what other
        // instances admitted since could make the difference.
        if used > limit || age >= STALE || (age >= FRESH && used > limit / 2) {
            return false;
        }
        e.used += n;
        match &mut e.refreshing {
            Some(since) => *since += n,
            None if age >= FRESH => {
                e.refreshing = Some(0);
                self.refresh(quota, owner.to_owned());
            }
            None => {}
        }
        true
    }

    /// Counts `owner`'s `quota` afresh in the background, for [`Self::admit_cached`].
    fn refresh(&self, quota: Quota, owner: String) {
        let quotas = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let fresh = quotas.count(quota, &owner).await;
            let mut counted = quotas.counted.lock().unwrap_or_else(|p| p.into_inner());
            let Some(e) = counted.get_mut(&(quota, owner)) else {
                return;
            };
            // Replaced meanwhile (a deletion, a refusal's count): that count is newer.
            let Some(since) = e.refreshing.take() else {
                return;
            };
            match fresh {
                Ok(used) => {
                    e.used = used.saturating_add(since);
                    e.read_at = started;
                }
                // The database is unreachable: the next admission tries again.
                Err(err) => tracing::debug!(error = %err, "quota count failed"),
            }
        });
    }

    /// After a deletion: the next admission counts afresh.
    pub fn forget(&self, quota: Quota, owner: &str) {
        self.counted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(quota, owner.to_owned()));
    }

    async fn count(&self, quota: Quota, owner: &str) -> AppResult<i64> {
        let mut conn = self.db.get().await?;
        let cap = self.limit(quota).saturating_add(1);
        match quota {
            Quota::Projects => db::usage::projects(&mut conn, owner, cap).await,
            Quota::ActiveJobs => db::usage::active_jobs(&mut conn, owner, cap).await,
            Quota::StorageBytes => Ok(db::usage::storage_bytes(&mut conn, owner)
                .await?
                .saturating_add(self.uploading(owner))),
        }
    }

    /// Each quota's limit and the owner's usage, counted now (a count stops one past
    /// its limit).
    pub async fn usage(&self, owner: &str) -> AppResult<Vec<(Quota, i64, i64)>> {
        let mut out = Vec::with_capacity(Quota::ALL.len());
        for quota in Quota::ALL {
            out.push((quota, self.limit(quota), self.count(quota, owner).await?));
        }
        Ok(out)
    }

    /// Bytes of the owner's uploads in progress on this instance.
    pub fn uploading(&self, owner: &str) -> i64 {
        self.uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(owner)
            .copied()
            .unwrap_or(0)
    }

    /// An upload in progress, counted until dropped.
    pub fn start_upload(&self, owner: &str) -> Uploading {
        Uploading {
            quotas: self.clone(),
            owner: owner.to_owned(),
            bytes: 0,
        }
    }
}

/// The bytes of one upload in progress, counted in its owner's storage.
pub struct Uploading {
    quotas: Quotas,
    owner: String,
    bytes: i64,
}

impl Uploading {
    /// The upload now holds `bytes` (declared, or written so far).
    pub fn set(&mut self, bytes: i64) {
        let mut uploading = self
            .quotas
            .uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let total = uploading.entry(self.owner.clone()).or_insert(0);
        *total += bytes - self.bytes;
        self.bytes = bytes;
    }

    pub fn bytes(&self) -> i64 {
        self.bytes
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }
}

impl Drop for Uploading {
    fn drop(&mut self) {
        let mut uploading = self
            .quotas
            .uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(total) = uploading.get_mut(&self.owner) {
            *total -= self.bytes;
            if *total <= 0 {
                uploading.remove(&self.owner);
            }
        }
    }
}

/// The refusal for `quota`, saying how much is in use.
pub fn exceeded(quota: Quota, limit: i64, used: i64) -> AppError {
    AppError::QuotaExceeded {
        quota: quota.name(),
        limit,
        message: format!("quota {} of {limit} reached ({used} in use)", quota.name()),
    }
}
