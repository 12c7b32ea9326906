//! The `sluicegate` binary: parse flags, bind the listeners, run until SIGINT or SIGTERM.

use std::process::ExitCode;

use sluicegate::config::{Cli, Command};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::load();
    if let Some(Command::CheckRules { path, buckets }) = &cli.command {
        return check_rules(path, buckets);
    }
    let Some(args) = cli.into_serve() else {
        return ExitCode::FAILURE;
    };
    // Before any log line: a bad value is the one line printed.
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluicegate: {e}");
            return ExitCode::from(2);
        }
    };
    sluicegate::telemetry::init_tracing(settings.log_format);

    let (grpc_addr, http_addr) = (settings.grpc.addr, settings.http.addr);
    let grpc = match TcpListener::bind(grpc_addr).await {
        Ok(l) => l,
        Err(e) => return fail(format!("GRPC_ADDR {grpc_addr}: cannot listen: {e}")),
    };
    let http = match TcpListener::bind(http_addr).await {
        Ok(l) => l,
        Err(e) => return fail(format!("HTTP_ADDR {http_addr}: cannot listen: {e}")),
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    match sluicegate::server::run(settings, grpc, http, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

/// `sluicegate check-rules PATH [--bucket DOMAIN:K=V,...]`: validate offline, print each rule
/// and its bucket, and how each sample RLQS bucket id matches.
fn check_rules(path: &std::path::Path, buckets: &[String]) -> ExitCode {
    match sluicegate_core::rules::load_path(path) {
        Ok(set) => {
            for rule in set.rules() {
                println!("{rule}");
            }
            for sample in buckets {
                match show_bucket(&set, sample) {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        eprintln!("sluicegate: --bucket {sample:?}: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            let mut domains: Vec<&str> = set.domains().collect();
            domains.sort_unstable();
            let plural = |n: usize, one: &str, many: &str| {
                format!("{n} {}", if n == 1 { one } else { many })
            };
            println!(
                "OK: {} in {} ({})",
                plural(set.rules().len(), "rule", "rules"),
                plural(domains.len(), "domain", "domains"),
                domains.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluicegate: invalid rules: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How a sample bucket id (`DOMAIN:key=value,...`) matches: the rule and what Envoy is assigned.
fn show_bucket(set: &sluicegate_core::rules::RuleSet, sample: &str) -> Result<String, String> {
    use sluicegate_core::rules::Limit;
    let (domain, pairs) = sample
        .split_once(':')
        .ok_or("expected DOMAIN:key=value,...")?;
    let pairs: Vec<(&str, &str)> = pairs
        .split(',')
        .map(|p| p.split_once('=').ok_or("each pair is key=value"))
        .collect::<Result<_, _>>()?;
    let Some(m) = set.lookup_bucket("", domain, &pairs) else {
        return Ok(format!(
            "bucket {sample}  -> no rule: ALLOW_ALL (counted as unmatched)"
        ));
    };
    let rule = &m.rule;
    let assigned = match rule.limit {
        _ if rule.shadow_mode => "ALLOW_ALL (shadow_mode: would-be denials counted)".to_string(),
        Limit::Unlimited => "ALLOW_ALL (unlimited)".to_string(),
        Limit::InFlight { .. } => "ALLOW_ALL (in-flight limits are not for quota)".to_string(),
        Limit::Blocked { .. } => "DENY_ALL".to_string(),
        Limit::Bucket { shape, .. } => format!(
            "token_bucket: a share of {}/s, {} deep, over every Envoy (by demand)",
            shape.rate(),
            shape.capacity()
        ),
    };
    Ok(format!(
        "bucket {sample}  -> {} ({})  {assigned}",
        rule.path, rule.source
    ))
}

/// One line on stderr (the contract for a bad start), exit status 1.
fn fail(message: String) -> ExitCode {
    eprintln!("sluicegate: {message}");
    ExitCode::FAILURE
}

/// The first SIGINT or SIGTERM starts a graceful shutdown; a second one exits at once.
async fn on_signal(shutdown: CancellationToken) {
    sluicegate::server::wait_for_signal().await;
    tracing::info!("signal received: shutting down gracefully (again to stop at once)");
    shutdown.cancel();
    sluicegate::server::wait_for_signal().await;
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}
