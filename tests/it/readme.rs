//! The README works when pasted: its Rust snippets are the ones `client/examples/readme.rs` compiles,
//! and the "Try it" shell block, run as written (with this build's binaries), prints what the
//! README says it prints.

use std::process::Command;

fn readme() -> String {
    std::fs::read_to_string(crate::support::repo_path("README.md")).unwrap()
}

/// The fenced blocks of `lang` in `text`, in order.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let open = format!("```{lang}");
    let mut out = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_end() == open => current = Some(Vec::new()),
            Some(lines) if line.trim_end() == "```" => {
                out.push(lines.join("\n"));
                current = None;
            }
            Some(lines) => lines.push(line),
            None => {}
        }
    }
    out
}

#[test]
fn the_rust_snippets_are_the_ones_that_compile() {
    let snippets = blocks(&readme(), "rust");
    let example =
        std::fs::read_to_string(crate::support::repo_path("client/examples/readme.rs")).unwrap();
    let mut compiled = Vec::new();
    let mut rest = example.as_str();
    while let Some(at) = rest.find("// README snippet begins\n") {
        let begin = at + 25;
        let end = rest.find("    // README snippet ends").unwrap();
        let lines: Vec<&str> = rest[begin..end]
            .lines()
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect();
        compiled.push(lines.join("\n"));
        rest = &rest[end + 26..];
    }
    assert_eq!(
        snippets.len(),
        3,
        "three Rust snippets (the rate layer, leased quota, the in-flight layer), mirrored in client/examples/readme.rs"
    );
    assert_eq!(
        compiled, snippets,
        "README and client/examples/readme.rs differ"
    );
}

/// The "Try it" block: sluicegate and the demo on their default ports, eight requests on a
/// bucket of five, a pause, one more. Run in an empty directory with only PATH set.
#[test]
fn try_it_prints_what_the_readme_says() {
    let text = readme();
    let section = &text[text.find("## Try it").unwrap()..text.find("## Call it").unwrap()];
    let block = blocks(section, "sh").remove(0);
    let bin_dir = std::path::Path::new(&crate::support::workspace_bin("sluicegate-demo"))
        .parent()
        .unwrap()
        .display()
        .to_string();
    // This build's binaries instead of a release build; the rest as written.
    let script: Vec<String> = block
        .lines()
        .filter(|l| !l.starts_with("cargo build"))
        .map(|l| l.replace("./target/release", &bin_dir))
        .collect();
    let script = format!(
        "trap 'kill $(jobs -p) 2>/dev/null' EXIT\n{}\n",
        script.join("\n")
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .args(["60", "bash", "-c", &script])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(dir.path())
        .output()
        .expect("bash and curl (apt-get install -y curl)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "The first five answers are 200 with X-RateLimit-Remaining counting 4, 3, 2, 1, 0; then
    // 429 with Retry-After: 2; after the pause, 200 again." (1 if the machine took over a second
    // for the eight requests: the refill had begun.)
    for (i, remaining) in ["4", "3", "2", "1", "0"].iter().enumerate() {
        assert!(
            lines[i].starts_with(&format!("200 remaining={remaining} ")),
            "{stdout}"
        );
    }
    for line in &lines[5..8] {
        assert!(
            line.starts_with("429 ")
                && (line.ends_with("retry-after=2") || line.ends_with("retry-after=1")),
            "{stdout}"
        );
    }
    assert!(lines[8].starts_with("HTTP/1.1 200"), "{stdout}");
    // The logs went to their files, not into the answers.
    assert!(dir.path().join("sluicegate.log").exists() && dir.path().join("demo.log").exists());
}
