//! deploy/kubernetes hangs together and matches the binary: every manifest passes the Kubernetes
//! schemas offline (PyPI kubernetes-validate, strict), and every env name, value, port, path and
//! name in them is cross-checked against sluicegate's own flags and a running sluicegate.

use std::{path::Path, process::Command};

use serde_json::Value;
use sluicegate::config::Cli;

const DIR: &str = "deploy/kubernetes";

fn yaml_docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.split("\n---\n")
        .map(|doc| serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

fn doc(file: &str) -> Value {
    yaml_docs(&format!("{DIR}/{file}")).remove(0)
}

/// The environment variables of `sluicegate serve`, with their long flags.
fn serve_env() -> Vec<(String, String)> {
    let cmd = Cli::definition();
    let serve = cmd.find_subcommand("serve").expect("a serve subcommand");
    serve
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_str()?.to_string(),
                a.get_long()?.to_string(),
            ))
        })
        .collect()
}

fn kubernetes_validate() -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/kubernetes-validate");
    assert!(
        p.exists(),
        "kubernetes-validate missing: scripts/test.sh installs it into .venv \
         (.venv/bin/pip install kubernetes-validate)"
    );
    p
}

#[test]
fn every_manifest_passes_the_kubernetes_schemas() {
    let kustomization = doc("kustomization.yaml");
    let files: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{DIR}/{}", r.as_str().unwrap()))
        .collect();
    assert!(files.len() >= 6, "{files:?}");
    let out = Command::new(kubernetes_validate())
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    // Every resource was checked against a schema (none skipped as unknown).
    let resources: usize = files.iter().map(|f| yaml_docs(f).len()).sum();
    assert_eq!(report.matches(" passed ").count(), resources, "{report}");
    assert!(!report.contains("Couldn't find schema"), "{report}");

    // And the check can fail: a misspelt field is refused.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(format!("{DIR}/deployment.yaml")).unwrap();
    std::fs::write(&bad, text.replace("readinessProbe:", "readinesProbe:")).unwrap();
    let out = Command::new(kubernetes_validate())
        .arg("--strict")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a misspelt field passed");
}

#[test]
fn kustomizations_reference_what_exists() {
    for dir in [DIR.to_string(), format!("{DIR}/servicemonitor")] {
        let k = yaml_docs(&format!("{dir}/kustomization.yaml")).remove(0);
        for r in k["resources"].as_array().unwrap() {
            let path = Path::new(&dir).join(r.as_str().unwrap());
            assert!(path.exists(), "{dir}: {} missing", path.display());
        }
    }
    let k = doc("kustomization.yaml");
    let deployment = doc("deployment.yaml");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(k["images"][0]["name"], container["image"]);
    // The Secret the Deployment reads REDIS_URL from is the one generated.
    let secret = &k["secretGenerator"][0];
    let env = container["env"].as_array().unwrap();
    let redis_url = env.iter().find(|e| e["name"] == "REDIS_URL").unwrap();
    let reference = &redis_url["valueFrom"]["secretKeyRef"];
    assert_eq!(reference["name"], secret["name"]);
    let literal = secret["literals"][0].as_str().unwrap();
    assert!(
        literal.starts_with(&format!("{}=", reference["key"].as_str().unwrap())),
        "{literal}"
    );
}

/// Every env name is one of sluicegate's, every value one it accepts (the whole set parsed and
/// validated as sluicegate parses it), and ports, probes, mounts, names and selectors agree.
#[tokio::test]
async fn the_deployment_matches_the_binary() {
    let deployment = doc("deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0], "serve", "a real subcommand");

    let known = serve_env();
    let k = doc("kustomization.yaml");
    let secret_url = k["secretGenerator"][0]["literals"][0]
        .as_str()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string();
    let mut argv = vec!["sluicegate".to_string(), "serve".to_string()];
    let mut env = std::collections::HashMap::new();
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let (_, long) = known
            .iter()
            .find(|(env, _)| env == name)
            .unwrap_or_else(|| panic!("{name} is not one of sluicegate's variables"));
        let value = match e["value"].as_str() {
            Some(v) => v.to_string(),
            None => secret_url.clone(),
        };
        argv.push(format!("--{long}={value}"));
        env.insert(name.to_string(), value);
    }
    let settings = Cli::parse_args(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .into_serve()
        .expect("serve")
        .settings()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));

    // Ports: the listeners' addresses are the container ports, named as the Service targets them.
    let port_of = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(u64::from(settings.grpc.addr.port()), port_of("grpc"));
    assert_eq!(u64::from(settings.http.addr.port()), port_of("http"));
    let service = doc("service.yaml");
    for p in service["spec"]["ports"].as_array().unwrap() {
        port_of(p["targetPort"].as_str().unwrap());
    }
    let monitor = yaml_docs(&format!("{DIR}/servicemonitor/servicemonitor.yaml")).remove(0);
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == endpoint["port"]),
        "the ServiceMonitor scrapes a port the Service has"
    );

    // Selectors pick the pods.
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (what, selector) in [
        ("deployment", &deployment["spec"]["selector"]["matchLabels"]),
        ("service", &service["spec"]["selector"]),
        ("pdb", &doc("pdb.yaml")["spec"]["selector"]["matchLabels"]),
        (
            "servicemonitor",
            &monitor["spec"]["selector"]["matchLabels"],
        ),
    ] {
        for (k, v) in selector.as_object().unwrap() {
            // The ServiceMonitor selects the Service, which carries the same label.
            let target = if what == "servicemonitor" {
                &service["metadata"]["labels"]
            } else {
                pod_labels
            };
            assert_eq!(&target[k], v, "{what} selector {k}");
        }
    }
    assert_eq!(
        doc("hpa.yaml")["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );

    // The rules: the mounted directory is RULES, and the ConfigMap's rules load.
    let mount = &container["volumeMounts"][0];
    assert_eq!(
        mount["mountPath"].as_str(),
        env.get("RULES").map(|s| s.as_str())
    );
    let volume = &pod["volumes"][0];
    assert_eq!(volume["name"], mount["name"]);
    let configmap = doc("rules-configmap.yaml");
    assert_eq!(volume["configMap"]["name"], configmap["metadata"]["name"]);
    for (file, text) in configmap["data"].as_object().unwrap() {
        let set = sluicegate_core::rules::parse_text(file, text.as_str().unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!set.rules().is_empty());
    }

    // Shutdown fits in the pod's grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        (settings.shutdown_delay + settings.shutdown_grace).as_secs() < grace,
        "SHUTDOWN_DELAY_SECS + SHUTDOWN_GRACE_SECS must fit in {grace} s"
    );

    // The example Redis is the one REDIS_URL names.
    let redis: Vec<Value> = yaml_docs(&format!("{DIR}/redis.yaml"));
    let redis_service = redis.iter().find(|d| d["kind"] == "Service").unwrap();
    let host = format!(
        "{}:{}",
        redis_service["metadata"]["name"].as_str().unwrap(),
        redis_service["spec"]["ports"][0]["port"]
    );
    assert!(secret_url.contains(&host), "{secret_url} vs {host}");

    // The probe paths are answered by a real sluicegate: liveness always, readiness when ready.
    let t = crate::support::Sluicegate::start(&[], &[]).await;
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let path = container[probe]["httpGet"]["path"].as_str().unwrap();
        assert_eq!(container[probe]["httpGet"]["port"], "http");
        let (status, _) = crate::support::http_get(&t.http_url(path)).await.unwrap();
        assert_eq!(status, 200, "{probe} {path}");
    }
    assert_eq!(endpoint["path"], "/metrics");
    let (status, _) = crate::support::http_get(&t.http_url("/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
}
