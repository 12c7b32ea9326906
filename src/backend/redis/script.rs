//! The wire contract of `lua/token_bucket.lua`: how a call is encoded and its reply decoded. The
//! script's header is the other half of this file.

use redis::{Cmd, Value};

use super::super::{BackendError, BucketRequest, ErrorKind};
use crate::core::{Decision, Op};

/// The token-bucket script; its header states its KEYS/ARGV/return contract.
pub const TOKEN_BUCKET_LUA: &str = include_str!("../../../lua/token_bucket.lua");

/// The number the script receives as a request's mode.
pub fn mode(req: &BucketRequest<'_>) -> u8 {
    let base = match req.op {
        Op::Take(_) => 1,
        Op::Check(_) => 2,
        Op::Refund(_) => return 3,
        Op::Force(_) => 4,
    };
    if req.veto { base } else { base + 4 }
}

/// An EVALSHA of the script for `reqs`, split into groups by `group_lens` (empty: each request on
/// its own). `sha` is the script's SHA1.
pub fn invocation<'a>(
    sha: &str,
    reqs: impl ExactSizeIterator<Item = &'a BucketRequest<'a>> + Clone,
    group_lens: &[usize],
) -> Cmd {
    let n = reqs.len();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha).arg(n);
    for r in reqs.clone() {
        cmd.arg(r.key);
    }
    for r in reqs {
        cmd.arg(r.shape.capacity())
            .arg(r.shape.rate())
            .arg(r.op.cost())
            .arg(mode(r));
    }
    if group_lens.iter().any(|&l| l > 1) {
        for &len in group_lens {
            cmd.arg(len);
        }
    }
    cmd
}

/// The decisions in a reply to a call for `n` requests.
pub fn decode(value: Value, n: usize) -> Result<Vec<Decision>, BackendError> {
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
            Ok(Decision {
                allowed: matches!(c[0], Value::Int(1)),
                tokens_remaining: tokens,
                retry_after_ms: int(&c[2])?,
                reset_after_ms: int(&c[3])?,
            })
        })
        .collect()
}
