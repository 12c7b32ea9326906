//! The wire contract of `lua/token_bucket.lua`: how a batch of jobs becomes one EVALSHA, and how
//! its reply becomes decisions. The script's header is the other half of this file.

use redis::{Cmd, Value};

use smallvec::SmallVec;

use crate::backend::{BackendError, ErrorKind};
use crate::{Ask, Decision, Op};

/// The token-bucket script; its header states its KEYS/ARGV/return contract.
pub const TOKEN_BUCKET_LUA: &str = include_str!("../../../../lua/token_bucket.lua");

/// The in-flight script; its header states its contract.
pub const IN_FLIGHT_LUA: &str = include_str!("../../../../lua/in_flight.lua");

/// The RLQS demand-exchange script; its header states its contract.
pub const RLQS_DEMAND_LUA: &str = include_str!("../../../../lua/rlqs_demand.lua");

/// The demand script's SHA1, computed once.
fn demand_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(RLQS_DEMAND_LUA).get_hash().to_string())
}

/// The EVALSHA of one demand exchange: every key declared (they share a hash tag).
pub fn demand(replica: &str, ttl_ms: u64, shares: &[crate::backend::DemandShare<'_>]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(demand_sha()).arg(shares.len());
    for s in shares {
        cmd.arg(s.key);
    }
    cmd.arg(replica).arg(ttl_ms);
    for s in shares {
        // A demand that is not a finite number >= 0 would be refused by the script: send 0.
        let demand = if s.demand.is_finite() && s.demand > 0.0 {
            s.demand
        } else {
            0.0
        };
        cmd.arg(format!("{demand}")).arg(s.participants);
    }
    cmd
}

/// The demand script's reply: `{demand, participants}` per key.
pub fn decode_demand(value: Value) -> Result<Vec<crate::quota::Fleet>, BackendError> {
    let bad = || unexpected("the demand script");
    let Value::Array(items) = value else {
        return Err(bad());
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(pair) = item else {
                return Err(bad());
            };
            let [demand, participants] = &pair[..] else {
                return Err(bad());
            };
            let demand = match demand {
                Value::BulkString(b) => std::str::from_utf8(b)
                    .ok()
                    .and_then(|t| t.parse::<f64>().ok())
                    .filter(|d| d.is_finite() && *d >= 0.0)
                    .ok_or_else(bad)?,
                _ => return Err(bad()),
            };
            let participants = match participants {
                Value::Int(n) => u32::try_from(*n).map_err(|_| bad())?,
                _ => return Err(bad()),
            };
            Ok(crate::quota::Fleet {
                demand,
                participants,
            })
        })
        .collect()
}

/// A script's reply in a shape its contract does not allow.
pub fn unexpected(what: &str) -> BackendError {
    BackendError {
        backend: "redis",
        kind: ErrorKind::Script,
        message: format!("{what} answered in an unexpected shape"),
    }
}

/// The in-flight script's SHA1, computed once.
pub fn in_flight_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(IN_FLIGHT_LUA).get_hash().to_string())
}

/// The EVALSHA of one lease operation (one key: declared KEYS on every topology).
pub fn in_flight(key: &str, id: &str, op: crate::LeaseOp) -> Cmd {
    use crate::LeaseOp;
    let (code, max, ttl, paired) = match op {
        LeaseOp::Acquire {
            max,
            ttl_ms,
            paired,
        } => (1, max, ttl_ms, paired),
        LeaseOp::Release => (2, 0, 0, false),
        LeaseOp::Renew { ttl_ms } => (3, 0, ttl_ms, false),
    };
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(in_flight_sha())
        .arg(1)
        .arg(key)
        .arg(code)
        .arg(id)
        .arg(max)
        .arg(ttl)
        .arg(u8::from(paired));
    cmd
}

/// The in-flight script's reply: `{done, in_flight, retry_after_ms, expired}`.
pub fn decode_in_flight(value: Value) -> Result<crate::InFlight, BackendError> {
    let bad = || BackendError {
        backend: "redis",
        kind: ErrorKind::Script,
        message: "the in-flight script answered in an unexpected shape".into(),
    };
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let ints: Vec<i64> = items
        .into_iter()
        .map(|v| match v {
            Value::Int(i) => Ok(i),
            _ => Err(bad()),
        })
        .collect::<Result<_, _>>()?;
    let [done, in_flight, retry, expired] = ints[..] else {
        return Err(bad());
    };
    let count = |v: i64| u32::try_from(v).map_err(|_| bad());
    Ok(crate::InFlight {
        done: done == 1,
        in_flight: count(in_flight)?,
        retry_after_ms: u64::try_from(retry).map_err(|_| bad())?,
        expired: count(expired)?,
    })
}

/// Where the keys go: declared KEYS (one server), or ARGV (a cluster node, whose keys span
/// several slots, which Redis refuses as declared KEYS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Keys,
    Argv,
}

/// One bucket operation, as the script takes it.
#[derive(Clone, Copy, Debug)]
pub struct Op1 {
    pub ask: Ask,
    pub kind: Kind,
}

/// What the script does with an operation besides deciding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Decided as its [`Op`] says.
    Decide,
    /// Settles the job's reservation for this bucket; the operation's cost is the real cost.
    Settle,
    /// Takes the operation's cost as this replica's lease if the bucket holds plenty (mode 11):
    /// never denied, never a veto; the answer's `reset_after_ms` is the lease's generation.
    Lease,
    /// Returns a lease of `size` tokens of `generation`, the operation's cost unspent (mode 12).
    Return { size: u64, generation: u64 },
}

impl From<Ask> for Op1 {
    fn from(ask: Ask) -> Self {
        Self {
            ask,
            kind: Kind::Decide,
        }
    }
}

impl Op1 {
    pub fn of(ask: Ask, kind: Kind) -> Self {
        Self { ask, kind }
    }
}

/// The buckets one job asks the script about: keys, operations, reservations, and whether they
/// are all or nothing (`group`).
pub struct Buckets {
    /// The keys, concatenated; `ends[i]` is where key i ends.
    pub keys: String,
    pub ends: SmallVec<[u32; 4]>,
    pub ops: SmallVec<[Op1; 4]>,
    /// (bucket index in the job, reservation key, TTL in ms): a reservation to record with a
    /// charged Take, or to settle.
    pub reservations: SmallVec<[(u32, String, u32); 1]>,
    pub group: bool,
    /// LEASE_MS, for a job with leases (every job of one replica has the same).
    pub lease_ms: u32,
}

impl Buckets {
    pub fn new(group: bool) -> Self {
        Self {
            keys: String::new(),
            ends: SmallVec::new(),
            ops: SmallVec::new(),
            reservations: SmallVec::new(),
            group,
            lease_ms: 0,
        }
    }

    /// One bucket operation.
    pub fn single(key: &str, op: Op1) -> Self {
        let mut buckets = Self::new(false);
        buckets.push(key, op);
        buckets
    }

    pub fn push(&mut self, key: &str, op: Op1) {
        self.keys.push_str(key);
        self.ends.push(self.keys.len() as u32);
        self.ops.push(op);
    }

    /// Gives the bucket just pushed a reservation key (with its TTL, for a Take).
    pub fn reserve_last(&mut self, key: String, ttl_ms: u32) {
        let i = self.ops.len().saturating_sub(1) as u32;
        self.reservations.push((i, key, ttl_ms));
    }

    /// How many buckets.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn key(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.keys[start..self.ends[i] as usize]
    }
}

/// The mode of a settle: the reservation decides the operation.
const SETTLE: u8 = 9;
/// A replica's lease, and its return.
const LEASE: u8 = 11;
const RETURN: u8 = 12;

impl Op1 {
    /// The number the script receives as this operation's mode.
    fn mode(&self) -> u8 {
        match self.kind {
            Kind::Decide => mode(self.ask.op, self.ask.veto),
            Kind::Settle => SETTLE,
            Kind::Lease => LEASE,
            Kind::Return { .. } => RETURN,
        }
    }

    fn leases(&self) -> bool {
        matches!(self.kind, Kind::Lease | Kind::Return { .. })
    }
}

/// The number the script receives as an operation's mode: 1 take, 2 check, 3 refund, 4 force,
/// 10 take up to; +4 when a denial does not veto its group (shadow rules).
pub fn mode(op: Op, veto: bool) -> u8 {
    let base = match op {
        Op::Take(_) => 1,
        Op::Check(_) => 2,
        Op::Refund(_) => return 3,
        Op::Force(_) => 4,
        Op::TakeUpTo(_) => 10,
    };
    if veto { base } else { base + 4 }
}

/// One EVALSHA deciding every job of `batch`, each job a group of its own when it is all or
/// nothing, else each of its decisions alone.
pub fn batch<'a, I>(sha: &str, batch: I, placement: Placement) -> Cmd
where
    I: IntoIterator<Item = &'a Buckets>,
    I::IntoIter: Clone,
{
    let batch = batch.into_iter();
    let n: usize = batch.clone().map(Buckets::len).sum();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha);
    match placement {
        Placement::Keys => cmd.arg(n),
        Placement::Argv => cmd.arg(0).arg(n),
    };
    for job in batch.clone() {
        for i in 0..job.len() {
            cmd.arg(job.key(i));
        }
    }
    for job in batch.clone() {
        for o in &job.ops {
            let a = o.ask;
            cmd.arg(a.shape.capacity())
                .arg(a.shape.rate())
                .arg(a.op.cost())
                .arg(o.mode());
        }
    }
    // Group lengths only when some group has more than one member (else all are alone anyway).
    if batch.clone().any(|j| j.group && j.len() > 1) {
        for job in batch.clone() {
            if job.group {
                cmd.arg(job.len());
            } else {
                for _ in 0..job.len() {
                    cmd.arg(1);
                }
            }
        }
    }
    trailers(&mut cmd, batch);
    cmd
}

/// The batch's reservations (`R`) and lease returns (`L`), each bucket by its index in the call.
fn trailers<'a, I>(cmd: &mut Cmd, batch: I)
where
    I: Iterator<Item = &'a Buckets> + Clone,
{
    if batch.clone().any(|j| !j.reservations.is_empty()) {
        cmd.arg("R");
        let mut offset = 0;
        for job in batch.clone() {
            for (i, key, ttl) in &job.reservations {
                cmd.arg(offset + *i as usize + 1).arg(key).arg(*ttl);
            }
            offset += job.len();
        }
    }
    if let Some(lease_ms) = batch
        .clone()
        .find(|j| j.ops.iter().any(Op1::leases))
        .map(|j| j.lease_ms.max(1))
    {
        cmd.arg("L").arg(lease_ms);
        let mut offset = 0;
        for job in batch {
            for (i, o) in job.ops.iter().enumerate() {
                if let Kind::Return { size, generation } = o.kind {
                    cmd.arg(offset + i + 1).arg(size).arg(generation);
                }
            }
            offset += job.len();
        }
    }
}

/// The key of reservation `id` of the bucket `bucket_key`: in the bucket's hash slot (a hash tag
/// that lands there), so that on a cluster the settle's one script call reaches both; it starts
/// with `{`, which no bucket key does (their prefixes cannot be empty).
pub fn reservation_key(bucket_key: &str, id: &str) -> String {
    let tag = slot_tag(super::topology::slot(bucket_key.as_bytes()));
    format!("{{{tag}}}tb:resv:{id}")
}

/// A short string whose hash slot is `slot`, found once for every slot.
fn slot_tag(slot: u16) -> &'static str {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); 16384];
        let mut left = tags.len();
        let mut n: u32 = 0;
        while left > 0 {
            let candidate = format!("{n:x}");
            let s = super::topology::slot(candidate.as_bytes()) as usize;
            if tags[s].is_empty() {
                tags[s] = candidate;
                left -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot)]
}

/// A settle's answer when its reservation was not found (the script says allowed = 2): tokens
/// are NaN, which no real answer has.
pub fn not_found(d: &Decision) -> bool {
    d.tokens_remaining.is_nan()
}

/// The decisions in a reply to a call for `n` buckets; None for a bucket that is away (its key is
/// not served by the node: its slot moved, or is moving).
pub fn decode(value: Value, n: usize) -> Result<Vec<Option<Decision>>, BackendError> {
    let bad = |what: String| BackendError {
        backend: "redis",
        kind: ErrorKind::Script,
        message: format!("unexpected script reply: {what}"),
    };
    let Value::Array(items) = value else {
        return Err(bad(format!("{value:?}")));
    };
    if items.len() != 4 * n {
        return Err(bad(format!("{} values for {n} buckets", items.len())));
    }
    let int = |v: &Value| match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        other => Err(bad(format!("{other:?} where a count of ms was expected"))),
    };
    items
        .chunks_exact(4)
        .map(|c| {
            let tokens = match &c[1] {
                Value::BulkString(b) => std::str::from_utf8(b)
                    .ok()
                    .and_then(|s| s.parse::<f64>().ok()),
                _ => None,
            }
            .ok_or_else(|| bad(format!("tokens {:?}", c[1])))?;
            if matches!(c[0], Value::Int(4)) {
                return Ok(None);
            }
            // The third value is what an allowed answer took, a denial's wait otherwise.
            let allowed = matches!(c[0], Value::Int(1));
            let third = int(&c[2])?;
            Ok(Some(Decision {
                allowed,
                tokens_remaining: if matches!(c[0], Value::Int(2)) {
                    f64::NAN
                } else {
                    tokens
                },
                retry_after_ms: if allowed { 0 } else { third },
                reset_after_ms: int(&c[3])?,
                without_backend: false,
                granted: if allowed { third } else { 0 },
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_lives_in_its_buckets_slot() {
        for key in [
            "tb:user:a|10/1",
            "tb:user:{tagged}x|1/1",
            "b",
            "tb:rls:4:edge",
        ] {
            let r = reservation_key(key, "00ff");
            assert_eq!(
                super::super::topology::slot(r.as_bytes()),
                super::super::topology::slot(key.as_bytes()),
                "{key} -> {r}"
            );
            assert!(r.starts_with('{') && r.ends_with("tb:resv:00ff"), "{r}");
        }
    }
}
