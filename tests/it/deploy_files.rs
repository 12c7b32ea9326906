//! The deployment files hang together: every file the compose stack references exists, service
//! names and ports agree across compose, Envoy, Prometheus and Grafana, everything parses, and
//! the dashboard has the panels and variable it promises. (No Docker engine runs here, so this is
//! what can be checked without one.)

use std::path::Path;

use serde_json::Value;

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Value {
    yaml("deploy/compose.yaml")
}

#[test]
fn compose_references_existing_files() {
    let c = compose();
    let services = c["services"].as_object().expect("services");
    for name in [
        "redis",
        "sluicegate",
        "demo",
        "envoy",
        "prometheus",
        "grafana",
        "load",
    ] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    let base = Path::new("deploy");
    for (name, svc) in services {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let source = v.as_str().unwrap().split(':').next().unwrap();
            assert!(
                base.join(source).exists(),
                "{name}: volume source {source} missing"
            );
        }
        if let Some(build) = svc.get("build") {
            let ctx = base.join(build["context"].as_str().unwrap());
            assert!(
                ctx.join(build["dockerfile"].as_str().unwrap()).exists(),
                "{name}: Dockerfile"
            );
        }
    }
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    assert!(
        dockerfile.contains("USER sluicegate"),
        "the runtime image runs as non-root"
    );
    assert!(dockerfile.matches("FROM ").count() >= 2, "multi-stage");
    for bin in ["sluicegate", "sluicegate-demo", "sluicegate-load"] {
        assert!(
            dockerfile.contains(&format!("target/release/{bin}")),
            "{bin} in the image"
        );
    }
}

#[test]
fn names_and_ports_agree() {
    let c = compose();
    let s = &c["services"];
    let env = |svc: &str, var: &str| {
        s[svc]["environment"][var]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(env("sluicegate", "REDIS_URL").contains("redis:6379"));
    let grpc_port = env("sluicegate", "GRPC_ADDR")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let http_port = env("sluicegate", "HTTP_ADDR")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let demo_port = env("demo", "DEMO_ADDR")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        env("demo", "TOLLGATE_URL"),
        format!("http://sluicegate:{grpc_port}")
    );

    let prom = yaml("dashboards/prometheus/prometheus.yml");
    let targets: Vec<String> = prom["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|j| {
            j["static_configs"][0]["targets"]
                .as_array()
                .unwrap()
                .clone()
        })
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    for t in [
        format!("sluicegate:{http_port}"),
        format!("demo:{demo_port}"),
        "envoy:9901".into(),
    ] {
        assert!(
            targets.contains(&t),
            "prometheus does not scrape {t}: {targets:?}"
        );
    }

    let envoy = std::fs::read_to_string("deploy/envoy/envoy-compose.yaml").unwrap();
    assert!(envoy.contains(&format!("address: sluicegate, port_value: {grpc_port}")));
    assert!(envoy.contains(&format!("address: demo, port_value: {demo_port}")));
    // Every element of every command and entrypoint is a string: an unquoted "--x=A: b" is a YAML
    // mapping, which docker compose refuses.
    for (name, service) in s.as_object().unwrap() {
        for field in ["command", "entrypoint"] {
            for element in service[field].as_array().into_iter().flatten() {
                assert!(
                    element.is_string(),
                    "{name:?} {field}: {element:?} is not a string (quote it)"
                );
            }
        }
    }
    let load = s["load"]["command"].as_array().unwrap();
    assert!(
        load.iter()
            .any(|a| a.as_str().unwrap().contains("http://envoy:10000/"))
    );
    assert!(
        s["envoy"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str() == Some("10000:10000"))
    );

    let ds = yaml("dashboards/grafana/provisioning/datasources/prometheus.yaml");
    assert_eq!(ds["datasources"][0]["url"], "http://prometheus:9090");
    let provider = yaml("dashboards/grafana/provisioning/dashboards/sluicegate.yaml");
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let grafana_volumes: Vec<&str> = s["grafana"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        grafana_volumes
            .iter()
            .any(|v| v.contains(&format!(":{path}/sluicegate.json"))),
        "{grafana_volumes:?}"
    );
}

#[test]
fn compose_envoy_config_validates() {
    for config in [
        "deploy/envoy/envoy-compose.yaml",
        "deploy/envoy/envoy-rlqs.yaml",
        "deploy/envoy/envoy-rlqs-compose.yaml",
    ] {
        let out = std::process::Command::new(crate::support::envoy_bin())
            .args(["--mode", "validate", "-c", config])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The compose stack's quota Envoy is the shipped one with the compose services as its upstreams:
/// the same filter, the same buckets.
#[test]
fn compose_rlqs_envoy_is_the_shipped_one() {
    let body = |path: &str| {
        let text = std::fs::read_to_string(path).unwrap();
        text[text.find("admin:").unwrap()..].to_string()
    };
    let shipped = body("deploy/envoy/envoy-rlqs.yaml")
        .replace(
            "address: 127.0.0.1, port_value: 9901",
            "address: 0.0.0.0, port_value: 9901",
        )
        .replace(
            "address: 127.0.0.1, port_value: 10000",
            "address: 0.0.0.0, port_value: 10000",
        )
        .replace(
            "address: 127.0.0.1, port_value: 8000",
            "address: demo, port_value: 8000",
        )
        .replace(
            "address: 127.0.0.1, port_value: 8081",
            "address: sluicegate, port_value: 8081",
        )
        .replace("type: STATIC", "type: STRICT_DNS");
    assert_eq!(shipped, body("deploy/envoy/envoy-rlqs-compose.yaml"));
    let c = compose();
    let volumes = c["services"]["envoy-rlqs"]["volumes"].as_array().unwrap();
    assert!(volumes.iter().any(|v| {
        v.as_str()
            .unwrap()
            .starts_with("./envoy/envoy-rlqs-compose.yaml:")
    }));
}

#[test]
fn dashboard_promises() {
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string("dashboards/grafana/sluicegate.json").unwrap(),
    )
    .unwrap();
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource")
    );
    let panels: Vec<&Value> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    let rows = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .count();
    assert!(rows >= 5, "one row per concern");
    let exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string())
        })
        .collect();
    for p in &panels {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        assert!(
            p["fieldConfig"]["defaults"]["unit"].is_string(),
            "unit of {}",
            p["title"]
        );
    }
    for metric in [
        "sluicegate_decisions_total",
        "sluicegate_decision_duration_seconds_bucket",
        "sluicegate_rule_decisions_total",
        "sluicegate_tokens_remaining",
        "sluicegate_backend_duration_seconds_bucket",
        "sluicegate_backend_errors_total",
        "sluicegate_failure_mode_total",
        "sluicegate_rules_reloads_total",
        "demo_http_requests_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel shows {metric}"
        );
    }
}

/// Every setting of `sluicegate serve --help` is in the README's configuration table, by variable
/// and by flag.
#[test]
fn the_readme_documents_every_setting() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let cmd = sluicegate::config::Cli::definition();
    let serve = cmd.find_subcommand("serve").unwrap();
    let mut missing = Vec::new();
    for arg in serve.get_arguments() {
        let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let env = env.to_str().unwrap();
        let row = readme.lines().find(|l| {
            l.starts_with("| `") && l.split(" | ").next().unwrap().contains(&format!("`{env}`"))
        });
        match row {
            Some(row) if row.contains(&format!("`--{long}`")) => {}
            _ => missing.push(format!("{env} (--{long})")),
        }
    }
    assert!(missing.is_empty(), "not in the README's table: {missing:?}");
}
