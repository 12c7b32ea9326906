//! HTTP: a small client that shows status, headers and body as they came (no library rewrites
//! them), metric values from a Prometheus text, and the `sluicegate-demo` fixture.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use super::process::{free_port, our_binary, serving, workspace_bin};

/// An HTTP answer: status, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 GET with extra headers over a fresh connection.
pub async fn http_request(url: &str, headers: &[(&str, &str)]) -> Option<HttpAnswer> {
    http_call("GET", url, headers, None).await
}

/// A minimal HTTP/1.1 POST of a JSON body over a fresh connection.
pub async fn http_post_json(url: &str, headers: &[(&str, &str)], body: &str) -> Option<HttpAnswer> {
    http_call("POST", url, headers, Some(body)).await
}

async fn http_call(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<HttpAnswer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(host))
            .await
            .ok()?
            .ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Some(HttpAnswer {
        status,
        headers,
        body,
    })
}

/// Sends `request` (raw bytes: header values an ordinary client would refuse) to 127.0.0.1:`port`
/// and returns the answer's status, when one came within 5 s. Reads the answer to its
/// Content-Length, not to the connection's close (Envoy lingers before closing).
pub async fn raw_http(port: u16, request: &[u8]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream.write_all(request).await.ok()?;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.ok()?;
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                });
                if n == 0 || length.is_some_and(|len| body.len() >= len) {
                    return head.split_whitespace().nth(1)?.parse().ok();
                }
            } else if n == 0 {
                return None;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()?
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    http_request(url, &[]).await.map(|a| (a.status, a.body))
}

/// A sample's value in Prometheus text: the first line starting with `series` (a metric name
/// with its labels, or a prefix of them).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A counter's value, 0 when the series is not there yet.
pub fn metric(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or(0.0)
}

/// A sluicegate-demo process on a free port.
pub struct Demo {
    pub port: u16,
    child: Option<Child>,
}

impl Demo {
    pub async fn start(sluicegate_grpc_url: &str, args: &[&str]) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let child = our_binary(&workspace_bin("sluicegate-demo"))
                .args(["--addr", &format!("127.0.0.1:{port}")])
                .args(["--sluicegate-url", sluicegate_grpc_url])
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn sluicegate-demo");
            let mut demo = Demo {
                port,
                child: Some(child),
            };
            let url = demo.url("/healthz");
            let up = serving(&mut demo.child, "sluicegate-demo", async || {
                http_get(&url).await.is_some_and(|(s, _)| s == 200)
            })
            .await;
            if up {
                return demo;
            }
        }
        panic!("sluicegate-demo did not start");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
