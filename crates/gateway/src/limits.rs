//! Bounds on what one client holds at once ([`InFlight`]): uploads per account (the upload
//! route, 429), and requests per client address: at most `max` in flight from one IP address; more are
//! answered `429 too_many_requests` at once (with `retry-after` and the connection closed),
//! before anything is read or verified. Together with the total connection cap
//! (`Settings::max_connections`), the header and body deadlines, this keeps slow or greedy
//! clients from holding the gateway's sockets (and, under `modelhub up`, the file handles the
//! other services of the process need).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::web;
use modelhub_core::{ApiError, ErrorCode};

/// Things in flight per key (a client address, an account), shared by every worker.
#[derive(Clone)]
pub struct InFlight<K: Eq + Hash + Clone> {
    max: usize,
    in_flight: Arc<Mutex<HashMap<K, usize>>>,
}

/// Requests in flight per client address.
pub type PerClient = InFlight<IpAddr>;

/// Uploads in flight per account.
pub type PerAccount = InFlight<String>;

/// One place; given back when dropped.
pub struct Slot<K: Eq + Hash + Clone> {
    owner: InFlight<K>,
    key: K,
}

impl<K: Eq + Hash + Clone> InFlight<K> {
    pub fn new(max: usize) -> InFlight<K> {
        InFlight {
            max,
            in_flight: Arc::default(),
        }
    }

    /// The most in flight per key.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for one more under `key`, or `None` when it has `max` in flight.
    pub fn try_acquire(&self, key: K) -> Option<Slot<K>> {
        let mut map = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            key,
        })
    }

    /// How many are in flight under `key`.
    pub fn in_flight(&self, key: &K) -> usize {
        let map = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(key).copied().unwrap_or(0)
    }
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut map = self
            .owner
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// The middleware (`actix_web::middleware::from_fn`): takes a [`Slot`] for the request's peer
/// address from the app's `web::Data<PerClient>` and holds it until the handler has answered.
pub async fn limit_per_client(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let limiter = req.app_data::<web::Data<PerClient>>().cloned();
    let slot = match (limiter, req.peer_addr()) {
        (Some(limiter), Some(peer)) => match limiter.try_acquire(peer.ip()) {
            Some(slot) => Some(slot),
            None => {
                let mut res = crate::error::error_response(&ApiError::new(
                    ErrorCode::TooManyRequests,
                    "too many requests in flight from this address",
                ));
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                res.head_mut()
                    .set_connection_type(actix_web::http::ConnectionType::Close);
                return Ok(req.into_response(res).map_into_right_body());
            }
        },
        _ => None,
    };
    let res = next.call(req).await?;
    drop(slot);
    Ok(res.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_address_and_given_back() {
        let limiter = PerClient::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = limiter.try_acquire(a).unwrap();
        let _second = limiter.try_acquire(a).unwrap();
        assert!(limiter.try_acquire(a).is_none(), "a third from one address");
        assert!(
            limiter.try_acquire(b).is_some(),
            "another address is not affected"
        );
        drop(first);
        assert_eq!(limiter.in_flight(&a), 1);
        assert!(limiter.try_acquire(a).is_some());
    }
}
