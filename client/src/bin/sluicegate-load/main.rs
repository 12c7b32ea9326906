//! sluicegate-load: drive sluicegate (ShouldAllow or Envoy's RLS) or any HTTP URL, print what it
//! saw, and prove the limits held.
//!
//! - `cli.rs`: flags; `keys.rs`: which key each request uses;
//! - `target.rs`: the three APIs behind one `call`;
//! - `driver.rs`: closed and open loops, progress bar;
//! - `record.rs`: counts, HDR latency, timeline, the bound check;
//! - `report.rs`: summary and JSON; `plot.rs`: the picture.
//!
//! Exit codes: 0 ok, 1 bad usage or unreachable target, 2 bound violated, 3 error budget exceeded.

mod cli;
mod driver;
mod keys;
mod plot;
mod record;
mod report;
mod target;

use std::process::ExitCode;

use clap::Parser;

use crate::{cli::Cli, keys::KeyChooser, record::Bound, report::Summary, target::Target};

/// An error and its causes, each said once: transport errors repeat their cause in their own
/// message ("tcp connect error: tcp connect error: ...").
fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // A cause whose text is already in an outer message adds nothing.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[tokio::main]
async fn main() -> ExitCode {
    // A bad flag is bad usage: exit 1, as documented (clap's own would be 2, "bound violated").
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(1);
        }
        Err(e) => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Err(e) = cli.validate() {
        eprintln!("sluicegate-load: {e}");
        return ExitCode::from(1);
    }
    let keys = match KeyChooser::new(cli.keys, &cli.key_prefix, cli.zipf) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("sluicegate-load: {e}");
            return ExitCode::from(1);
        }
    };
    let target = match Target::connect(&cli).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sluicegate-load: {}", chain(&e));
            return ExitCode::from(1);
        }
    };

    let mut run = driver::run(&cli, target, keys).await;
    let bound = if cli.check_bound {
        run.recorded.check_bound()
    } else {
        Bound::default()
    };
    let summary = Summary::new(&cli, &run, &bound);
    print!("{}", summary.text(&cli, &bound));

    if let Some(path) = &cli.json {
        let written = serde_json::to_vec_pretty(&summary)
            .map_err(anyhow::Error::from)
            .and_then(|json| Ok(std::fs::write(path, json)?));
        if let Err(e) = written {
            eprintln!("sluicegate-load: --json {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    let shown = cli.duration.as_secs_f64().ceil() as usize;
    if let Some(Err(e)) = cli.plot.as_ref().map(|p| plot::draw(&summary, shown, p)) {
        eprintln!("sluicegate-load: --plot: {e:#}");
        return ExitCode::from(1);
    }

    if bound.violations > 0 {
        eprintln!(
            "sluicegate-load: BOUND VIOLATED in {} buckets",
            bound.violations
        );
        return ExitCode::from(2);
    }
    let error_rate = if summary.requests == 0 {
        1.0
    } else {
        summary.errors as f64 / summary.requests as f64
    };
    if error_rate > cli.max_error_rate {
        eprintln!(
            "sluicegate-load: error rate {:.2}% exceeds --max-error-rate {:.2}%",
            error_rate * 100.0,
            cli.max_error_rate * 100.0
        );
        return ExitCode::from(3);
    }
    ExitCode::SUCCESS
}
