//! A real sluicegate, run in this process (memory backend) on ephemeral loopback ports.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running sluicegate, stopped when dropped.
pub struct Sluicegate {
    /// Its gRPC address, `http://127.0.0.1:PORT`.
    pub url: String,
    stop: CancellationToken,
}

impl Drop for Sluicegate {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts sluicegate with `flags` (as on its command line) on free loopback ports.
pub async fn sluicegate(flags: &[&str]) -> Sluicegate {
    let mut argv = vec!["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"];
    // The product's MAX_QUEUE_MS (10 ms), and the adaptive limit that aims under it, would shed
    // calls of these tests now and then on two busy cores (a debug build, the load client in the
    // same process): a test about the client sets a tolerance far above that.
    if !flags.iter().any(|f| f.starts_with("--max-queue-ms")) {
        argv.extend_from_slice(&["--max-queue-ms", "1000"]);
    }
    argv.extend_from_slice(flags);
    let settings = sluicegate::config::Settings::from_flags(argv).unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", grpc.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(sluicegate::server::run(settings, grpc, http, stop.clone()));
    Sluicegate { url, stop }
}
