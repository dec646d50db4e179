//! Rates: how many requests a caller may make per unit of time, as token buckets (GCRA,
//! `governor`) shared by every worker of a gateway. Over a rate the answer is
//! `429 too_many_requests` with the exact `retry-after`, and nothing is charged or run.
//!
//! - [`RateLimits`]: every signed request, per API key and per account
//!   (`--requests-per-second-per-key`, `--requests-per-second-per-account`). Checked after the
//!   signature and before the nonce is spent, so a flooding key also cannot make the registry
//!   keep more nonces than its rate.
//! - [`ModelQuotas`]: predictions (rows) of one model per account per minute, when the model's
//!   owner set `calls_per_minute` at upload.
//! - [`FreeQuota`]: predictions (rows) of free models per account per minute
//!   (`--free-calls-per-minute`): a free model is metered by this instead of credits.
//!
//! The buckets live in the gateway's memory: with several replicas each has its own, so the
//! rate a caller gets is per replica (docs/OPERATIONS.md).

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use modelhub_core::{ApiError, ErrorCode};

/// Forget the buckets of keys that are full again this often (in checks).
const PRUNE_EVERY: u64 = 4096;

/// One token bucket per key, all with the same quota: `burst` tokens, refilled steadily over
/// one `period`.
pub struct Buckets<K: Hash + Eq + Clone> {
    burst: NonZeroU32,
    limiter: DefaultKeyedRateLimiter<K>,
    checks: AtomicU64,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// `n` per second, a burst of `n`.
    pub fn per_second(n: NonZeroU32) -> Buckets<K> {
        Buckets::with(n, Quota::per_second(n))
    }

    /// `n` per minute, a burst of `n`.
    pub fn per_minute(n: NonZeroU32) -> Buckets<K> {
        Buckets::with(n, Quota::per_minute(n))
    }

    fn with(burst: NonZeroU32, quota: Quota) -> Buckets<K> {
        Buckets {
            burst,
            limiter: RateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes `n` tokens of `key`'s bucket, or says how long until there are that many (a
    /// minute when `n` is more than the bucket holds: such a request never fits).
    pub fn check(&self, key: &K, n: u32) -> Result<(), Duration> {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks % PRUNE_EVERY == PRUNE_EVERY - 1 {
            // Memory stays bounded by the keys seen lately.
            self.limiter.retain_recent();
        }
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        match self.limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(later)) => Err(later.wait_time_from(DefaultClock::default().now())),
            Err(_) => Err(Duration::from_secs(60)),
        }
    }

    /// The most tokens the bucket holds: the largest request that can ever pass.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }
}

/// A refusal for going over a rate: what was exceeded, and when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverRate {
    /// Ends the sentence "this …": e.g. "API key may make 100 requests per second".
    pub what: String,
    pub retry_after: Duration,
}

impl OverRate {
    /// The client's error: 429 "this …".
    pub fn error(&self) -> ApiError {
        ApiError::new(ErrorCode::TooManyRequests, format!("this {}", self.what))
    }

    /// `retry-after` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// Requests per second per API key and per account (either may be off).
pub struct RateLimits {
    per_key: Option<Buckets<String>>,
    per_account: Option<Buckets<String>>,
}

impl RateLimits {
    /// `0` turns a limit off.
    pub fn new(per_key: u32, per_account: u32) -> RateLimits {
        RateLimits {
            per_key: NonZeroU32::new(per_key).map(Buckets::per_second),
            per_account: NonZeroU32::new(per_account).map(Buckets::per_second),
        }
    }

    /// Counts one request of `key_id` (of `account_id`). A request the key's rate refuses is
    /// not counted against the account's.
    pub fn check(&self, key_id: &str, account_id: &str) -> Result<(), OverRate> {
        let over = |b: &Buckets<String>, who: &str, wait| OverRate {
            what: format!("{who} may make {} requests per second", b.burst()),
            retry_after: wait,
        };
        if let Some(b) = &self.per_key {
            b.check(&key_id.to_owned(), 1)
                .map_err(|wait| over(b, "API key", wait))?;
        }
        if let Some(b) = &self.per_account {
            b.check(&account_id.to_owned(), 1)
                .map_err(|wait| over(b, "account", wait))?;
        }
        Ok(())
    }
}

/// The owners' per-model rates: each account may make `calls_per_minute` predictions (rows)
/// of such a model per minute. One set of buckets per distinct rate, keyed by account and
/// model, made when first needed.
#[derive(Default)]
pub struct ModelQuotas {
    by_rate: RwLock<HashMap<NonZeroU32, Arc<PerAccountAndModel>>>,
}

/// Buckets keyed by (account id, model id).
type PerAccountAndModel = Buckets<(String, String)>;

impl ModelQuotas {
    /// Takes `rows` of `account_id`'s quota for `model_id`, whose owner allows
    /// `calls_per_minute` (0: no quota).
    pub fn check(
        &self,
        model_id: &str,
        calls_per_minute: u32,
        account_id: &str,
        rows: u32,
    ) -> Result<(), OverRate> {
        let Some(rate) = NonZeroU32::new(calls_per_minute) else {
            return Ok(());
        };
        // More rows than the bucket holds: a minute, as `Buckets::check` says.
        self.buckets(rate)
            .check(&(account_id.to_owned(), model_id.to_owned()), rows)
            .map_err(|retry_after| OverRate {
                what: format!("model takes at most {rate} predictions per minute from one account"),
                retry_after,
            })
    }

    fn buckets(&self, rate: NonZeroU32) -> Arc<PerAccountAndModel> {
        if let Some(b) = self
            .by_rate
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&rate)
        {
            return b.clone();
        }
        self.by_rate
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(rate)
            .or_insert_with(|| Arc::new(Buckets::per_minute(rate)))
            .clone()
    }
}

/// The free-model policy: each account may make `per_minute` predictions of free (price 0)
/// models per minute on this gateway, in a bucket that holds one minute's worth, so a burst
/// of `per_minute` is fine and the bucket refills steadily. Paid predictions don't touch it.
/// Without it a free model is unmetered: one account could occupy the inference and prover
/// queues at no cost.
pub type FreeQuota = Buckets<String>;

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).unwrap()
    }

    #[test]
    fn the_free_quota_is_per_account_and_says_when_to_come_back() {
        let quota = FreeQuota::per_minute(n(3));
        let a = "acct_a".to_owned();
        quota.check(&a, 2).unwrap();
        quota.check(&a, 1).unwrap();
        let wait = quota.check(&a, 1).unwrap_err();
        // One call comes back every 20 s.
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        // A batch counts its rows: three at once fit, a fourth row must wait.
        let b = "acct_b".to_owned();
        quota
            .check(&b, 3)
            .expect("another account has its own quota");
        assert!(quota.check(&b, 1).is_err());
        let wait = quota.check(&"acct_c".to_owned(), 4).unwrap_err();
        assert_eq!(
            wait,
            Duration::from_secs(60),
            "more than the burst never fits"
        );
    }

    #[test]
    fn keys_and_accounts_have_their_own_rates() {
        let limits = RateLimits::new(2, 3);
        limits.check("key_1", "acct_a").unwrap();
        limits.check("key_1", "acct_a").unwrap();
        let over = limits.check("key_1", "acct_a").unwrap_err();
        assert_eq!(over.what, "API key may make 2 requests per second");
        assert!(over.retry_after <= Duration::from_secs(1), "{over:?}");
        assert_eq!(over.retry_after_secs(), 1);
        // Another key of the same account has its own bucket, but the account's third request
        // of the second is its last.
        limits.check("key_2", "acct_a").unwrap();
        let over = limits.check("key_2", "acct_a").unwrap_err();
        assert_eq!(over.what, "account may make 3 requests per second");
        // Another account is untouched.
        limits.check("key_3", "acct_b").unwrap();
        // 0 turns a limit off.
        let off = RateLimits::new(0, 0);
        for _ in 0..10_000 {
            off.check("key_1", "acct_a").unwrap();
        }
    }

    #[test]
    fn a_model_quota_is_per_account_and_model_and_counts_rows() {
        let quotas = ModelQuotas::default();
        quotas.check("mdl_x", 0, "acct_a", 1_000).expect("no quota");
        quotas.check("mdl_x", 5, "acct_a", 4).unwrap();
        let over = quotas.check("mdl_x", 5, "acct_a", 2).unwrap_err();
        assert_eq!(
            over.what,
            "model takes at most 5 predictions per minute from one account"
        );
        assert!(over.retry_after > Duration::from_secs(1), "{over:?}");
        quotas
            .check("mdl_x", 5, "acct_a", 1)
            .expect("the fifth row");
        quotas
            .check("mdl_x", 5, "acct_b", 5)
            .expect("another account");
        quotas
            .check("mdl_y", 5, "acct_a", 5)
            .expect("another model");
        let over = quotas.check("mdl_z", 5, "acct_a", 6).unwrap_err();
        assert_eq!(over.retry_after, Duration::from_secs(60), "never fits");
        // Models with the same rate share one set of buckets; another rate gets its own.
        quotas.check("mdl_w", 7, "acct_a", 7).unwrap();
        assert_eq!(quotas.by_rate.read().unwrap().len(), 2);
    }
}
