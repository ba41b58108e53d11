//! The cluster-wide limit on upgrades running at once: `N` Lease objects
//! (`coordination.k8s.io/v1`, `baton-upgrade-slot-<i>` in the driver's namespace) are the
//! slots. Before it upgrades a mount, a node agent takes a slot that is free (no holder) or
//! expired (not renewed for its duration), renews it while the upgrade runs and frees it
//! after. Every write carries the resourceVersion it read, so two agents never both take
//! one slot: the loser gets a conflict and tries the next one.
//!
//! [`choose`] is the decision, pure (observed leases + now); [`SlotPool`] does the I/O:
//! one `list` of the slots (by label) per attempt, one write to take, one per renewal, one
//! to free.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::chrono::{DateTime, Utc};
use kube::api::{Api, ListParams, PostParams};
use std::sync::{Arc, Mutex};

/// The label every slot Lease carries (so one `list` finds them all).
pub const SLOT_LABEL: &str = "baton.dev/upgrade-slot";
/// How long a slot stays taken without renewal.
pub const DEFAULT_LEASE_SECS: i32 = 30;

/// The name of slot `i`.
pub fn slot_name(i: usize) -> String {
    format!("baton-upgrade-slot-{i}")
}

/// What an agent saw of one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub index: usize,
    pub holder: Option<String>,
    pub renewed: Option<DateTime<Utc>>,
    pub duration_secs: i32,
    pub resource_version: Option<String>,
}

/// What to do to hold a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Create slot `index` (no Lease of that name yet).
    Create { index: usize },
    /// Take slot `index` (free or expired) by replacing it at this version.
    Take {
        index: usize,
        resource_version: String,
    },
    /// Every slot is held and live: look again after this long.
    Wait { retry_after: Duration },
}

/// Whether `o` may be taken at `now` by `me`.
fn takeable(o: &Observed, me: &str, now: DateTime<Utc>) -> bool {
    match o.holder.as_deref() {
        None | Some("") => true,
        // Our own (a restarted agent): take it back.
        Some(h) if h == me => true,
        Some(_) => match o.renewed {
            None => true,
            Some(t) => {
                now >= t + k8s_openapi::chrono::Duration::seconds(i64::from(o.duration_secs.max(1)))
            }
        },
    }
}

/// The slot to take among `count` slots, given what was observed (slots absent from
/// `observed` do not exist yet) and the slots that just gave a conflict (`skip`): the
/// first takeable or missing one from slot `first` on (wrapping around). Nodes start
/// from different slots ([`first_slot`]), so that waiters do not all race for slot 0.
pub fn choose(
    observed: &[Observed],
    count: usize,
    me: &str,
    now: DateTime<Utc>,
    skip: &[usize],
    first: usize,
) -> Decision {
    for i in (0..count).map(|k| (first + k) % count) {
        if skip.contains(&i) {
            continue;
        }
        match observed.iter().find(|o| o.index == i) {
            Some(o) if takeable(o, me, now) => {
                if let Some(rv) = &o.resource_version {
                    return Decision::Take {
                        index: i,
                        resource_version: rv.clone(),
                    };
                }
            }
            Some(_) => {}
            None => return Decision::Create { index: i },
        }
    }
    // Retry about when the first live slot expires (between 1 and 5 s).
    let soonest = observed
        .iter()
        .filter_map(|o| {
            let t = o.renewed? + k8s_openapi::chrono::Duration::seconds(i64::from(o.duration_secs));
            (t - now).to_std().ok()
        })
        .min()
        .unwrap_or(Duration::from_secs(1));
    Decision::Wait {
        retry_after: soonest.clamp(Duration::from_secs(1), Duration::from_secs(5)),
    }
}

/// Where node `holder` starts looking among `count` slots: a hash of its name.
pub fn first_slot(holder: &str, count: usize) -> usize {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(holder.as_bytes());
    let n = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    usize::try_from(n % count.max(1) as u64).unwrap_or(0)
}

/// The index of a slot Lease from its name (`None` for anything else).
pub fn slot_index(name: &str) -> Option<usize> {
    name.strip_prefix("baton-upgrade-slot-")?.parse().ok()
}

fn observe(l: &Lease) -> Option<Observed> {
    let index = slot_index(l.metadata.name.as_deref()?)?;
    let spec = l.spec.clone().unwrap_or_default();
    Some(Observed {
        index,
        holder: spec.holder_identity,
        renewed: spec.renew_time.or(spec.acquire_time).map(|t| t.0),
        duration_secs: spec.lease_duration_seconds.unwrap_or(DEFAULT_LEASE_SECS),
        resource_version: l.metadata.resource_version.clone(),
    })
}

/// Why a slot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("listing the upgrade slots")]
    List(#[source] kube::Error),
    #[error("taking upgrade slot {0}")]
    Take(usize, #[source] kube::Error),
}

/// The slots of a cluster, as one agent uses them.
#[derive(Clone)]
pub struct SlotPool {
    pub client: kube::Client,
    pub namespace: String,
    pub count: usize,
    /// The holder identity: the node name.
    pub holder: String,
    pub lease_secs: i32,
}

impl std::fmt::Debug for SlotPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotPool")
            .field("namespace", &self.namespace)
            .field("count", &self.count)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

/// A slot held: renewed in the background until [`Slot::release`].
#[derive(Debug)]
pub struct Slot {
    pub index: usize,
    api: Api<Lease>,
    lease: Arc<Mutex<Lease>>,
    renewer: tokio::task::JoinHandle<()>,
}

fn lease_of(
    name: String,
    holder: Option<&str>,
    secs: i32,
    now: DateTime<Utc>,
    prev: Option<&Lease>,
) -> Lease {
    let mut l = prev.cloned().unwrap_or_default();
    l.metadata.name = Some(name);
    l.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(SLOT_LABEL.to_string(), "true".to_string());
    let transitions = prev
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0);
    l.spec = Some(LeaseSpec {
        holder_identity: holder.map(str::to_string),
        lease_duration_seconds: Some(secs),
        acquire_time: holder.map(|_| MicroTime(now)),
        renew_time: holder.map(|_| MicroTime(now)),
        lease_transitions: Some(transitions + i32::from(holder.is_some())),
    });
    l
}

fn lock(l: &Mutex<Lease>) -> std::sync::MutexGuard<'_, Lease> {
    l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SlotPool {
    fn api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Waits for a slot and takes it.
    pub async fn acquire(&self) -> Result<Slot, SlotError> {
        loop {
            match self.try_take().await? {
                Ok(slot) => return Ok(slot),
                Err(retry_after) => {
                    // Up to half a second more, so that the waiters do not all come back
                    // at the same moment.
                    let jitter = Duration::from_nanos(u64::from(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .subsec_nanos()
                            % 500_000_000,
                    ));
                    tracing::debug!(?retry_after, "every upgrade slot is taken; waiting");
                    tokio::time::sleep(retry_after + jitter).await;
                }
            }
        }
    }

    /// One round: takes a free slot (trying the next one after each conflict) or, when
    /// every slot is live, says how long to wait before the next round.
    pub async fn try_take(&self) -> Result<Result<Slot, Duration>, SlotError> {
        let api = self.api();
        let mut skip = Vec::new();
        loop {
            let list = api
                .list(&ListParams::default().labels(&format!("{SLOT_LABEL}=true")))
                .await
                .map_err(SlotError::List)?;
            let observed: Vec<Observed> = list.items.iter().filter_map(observe).collect();
            let now = Utc::now();
            let first = first_slot(&self.holder, self.count);
            let (index, taken) =
                match choose(&observed, self.count, &self.holder, now, &skip, first) {
                    Decision::Wait { retry_after } => return Ok(Err(retry_after)),
                    Decision::Create { index } => {
                        let l = lease_of(
                            slot_name(index),
                            Some(&self.holder),
                            self.lease_secs,
                            now,
                            None,
                        );
                        (index, api.create(&PostParams::default(), &l).await)
                    }
                    Decision::Take {
                        index,
                        resource_version,
                    } => {
                        let prev = list
                            .items
                            .iter()
                            .find(|l| l.metadata.name.as_deref() == Some(&slot_name(index)));
                        let mut l = lease_of(
                            slot_name(index),
                            Some(&self.holder),
                            self.lease_secs,
                            now,
                            prev,
                        );
                        l.metadata.resource_version = Some(resource_version);
                        (
                            index,
                            api.replace(&slot_name(index), &PostParams::default(), &l)
                                .await,
                        )
                    }
                };
            match taken {
                Ok(lease) => {
                    tracing::info!(slot = index, holder = %self.holder, "upgrade slot taken");
                    return Ok(Ok(self.hold(index, lease)));
                }
                // Someone else took it first (409 conflict, or it already exists).
                Err(kube::Error::Api(e)) if e.code == 409 => skip.push(index),
                Err(e) => return Err(SlotError::Take(index, e)),
            }
        }
    }

    fn hold(&self, index: usize, lease: Lease) -> Slot {
        let api = self.api();
        let lease = Arc::new(Mutex::new(lease));
        let (api2, lease2, secs) = (api.clone(), Arc::clone(&lease), self.lease_secs);
        let me = self.holder.clone();
        let renewer = tokio::spawn(async move {
            let every = Duration::from_secs(u64::try_from(secs.max(3) / 3).unwrap_or(1));
            loop {
                tokio::time::sleep(every).await;
                let mut l = lock(&lease2).clone();
                if let Some(s) = l.spec.as_mut() {
                    s.renew_time = Some(MicroTime(Utc::now()));
                }
                match api2
                    .replace(&slot_name(index), &PostParams::default(), &l)
                    .await
                {
                    Ok(new) => *lock(&lease2) = new,
                    Err(e) => {
                        tracing::warn!(slot = index, error = %crate::error::chain(&e), "cannot renew the upgrade slot");
                        // Renew from the current version next time, if it is still ours.
                        if let Ok(cur) = api2.get(&slot_name(index)).await {
                            let ours = cur.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                                == Some(me.as_str());
                            if !ours {
                                tracing::warn!(
                                    slot = index,
                                    "the upgrade slot was taken over (expired)"
                                );
                                return;
                            }
                            *lock(&lease2) = cur;
                        }
                    }
                }
            }
        });
        Slot {
            index,
            api,
            lease,
            renewer,
        }
    }
}

impl Slot {
    /// Stops renewing and frees the slot (clears the holder). A failure is logged: the
    /// slot then frees itself when its lease expires.
    pub async fn release(self) {
        self.renewer.abort();
        let _ = self.renewer.await;
        let l = lock(&self.lease).clone();
        let freed = lease_of(
            slot_name(self.index),
            None,
            DEFAULT_LEASE_SECS,
            Utc::now(),
            Some(&l),
        );
        let mut freed = freed;
        freed.metadata.resource_version = l.metadata.resource_version.clone();
        match self
            .api
            .replace(&slot_name(self.index), &PostParams::default(), &freed)
            .await
        {
            Ok(_) => tracing::info!(slot = self.index, "upgrade slot freed"),
            Err(e) => {
                tracing::warn!(slot = self.index, error = %crate::error::chain(&e), "cannot free the upgrade slot; it expires by itself")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::chrono::TimeZone;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0)
            .single()
            .expect("time")
    }

    fn held(index: usize, holder: &str, renewed: i64) -> Observed {
        Observed {
            index,
            holder: Some(holder.into()),
            renewed: Some(at(renewed)),
            duration_secs: 30,
            resource_version: Some(format!("{}", 100 + index)),
        }
    }

    fn free(index: usize) -> Observed {
        Observed {
            holder: None,
            renewed: None,
            ..held(index, "", 0)
        }
    }

    #[test]
    fn a_missing_slot_is_created_and_a_free_one_taken() {
        assert_eq!(
            choose(&[], 2, "n1", at(0), &[], 0),
            Decision::Create { index: 0 }
        );
        assert_eq!(
            choose(&[held(0, "n2", 0)], 2, "n1", at(1), &[], 0),
            Decision::Create { index: 1 }
        );
        assert_eq!(
            choose(&[held(0, "n2", 0), free(1)], 2, "n1", at(1), &[], 0),
            Decision::Take {
                index: 1,
                resource_version: "101".into()
            }
        );
    }

    #[test]
    fn live_slots_make_us_wait_and_expired_ones_are_reclaimed() {
        let slots = [held(0, "n2", 0), held(1, "n3", 10)];
        assert_eq!(
            choose(&slots, 2, "n1", at(29), &[], 0),
            Decision::Wait {
                retry_after: Duration::from_secs(1)
            }
        );
        assert_eq!(
            choose(&slots, 2, "n1", at(20), &[], 0),
            Decision::Wait {
                retry_after: Duration::from_secs(5)
            }
        );
        // Slot 0 was last renewed at 0 for 30 s: expired at 30.
        assert_eq!(
            choose(&slots, 2, "n1", at(30), &[], 0),
            Decision::Take {
                index: 0,
                resource_version: "100".into()
            }
        );
        // More slots than the limit are never used: slot 2 is not created.
        assert!(matches!(
            choose(&slots, 2, "n1", at(5), &[], 0),
            Decision::Wait { .. }
        ));
    }

    #[test]
    fn nodes_start_from_their_own_slot_and_wrap_around() {
        let all_free = [free(0), free(1), free(2)];
        assert_eq!(
            choose(&all_free, 3, "n1", at(0), &[], 2),
            Decision::Take {
                index: 2,
                resource_version: "102".into()
            }
        );
        assert_eq!(
            choose(&all_free, 3, "n1", at(0), &[2], 2),
            Decision::Take {
                index: 0,
                resource_version: "100".into()
            }
        );
        assert_eq!(
            choose(&[free(0)], 3, "n1", at(0), &[], 1),
            Decision::Create { index: 1 }
        );
        // Node names spread over the slots.
        let firsts: std::collections::BTreeSet<usize> = (0..50)
            .map(|i| first_slot(&format!("node-{i}"), 10))
            .collect();
        assert!(firsts.len() >= 8, "{firsts:?}");
        assert!(firsts.iter().all(|f| *f < 10));
        assert_eq!(first_slot("x", 0), 0);
    }

    #[test]
    fn a_conflict_moves_on_to_the_next_slot_and_our_own_slot_is_ours() {
        assert_eq!(
            choose(&[free(0), free(1)], 2, "n1", at(0), &[0], 0),
            Decision::Take {
                index: 1,
                resource_version: "101".into()
            }
        );
        assert!(matches!(
            choose(&[free(0), held(1, "n2", 0)], 2, "n1", at(0), &[0], 0),
            Decision::Wait { .. }
        ));
        assert_eq!(
            choose(&[held(0, "n1", 0)], 1, "n1", at(1), &[], 0),
            Decision::Take {
                index: 0,
                resource_version: "100".into()
            }
        );
    }

    #[test]
    fn only_slot_names_are_slots() {
        assert_eq!(slot_index("baton-upgrade-slot-3"), Some(3));
        assert_eq!(slot_index("baton-upgrade-slot-x"), None);
        assert_eq!(slot_index("kube-scheduler"), None);
    }
}
