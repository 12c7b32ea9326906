//! Test certificates made with openssl: a CA, and server or client certificates signed by it
//! with the SANs a test needs (ECDSA P-256: quick to make).

use std::path::{Path, PathBuf};
use std::process::Command;

pub const INSTALL_OPENSSL: &str =
    "openssl not found: install it with `apt-get install -y openssl` (scripts/test.sh does)";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{INSTALL_OPENSSL} ({e})"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority in `dir`, named `name`.
pub struct Ca {
    pub dir: PathBuf,
    pub name: String,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Self {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=sluicegate test {name}"),
            ],
        );
        Self {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    pub fn pem(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A leaf certificate `leaf.pem` / `leaf.key` with `sans` (`DNS:localhost`,
    /// `URI:spiffe://...`, `IP:127.0.0.1`) for `usage` (`serverAuth` or `clientAuth`).
    pub fn issue(&self, leaf: &str, sans: &[&str], usage: &str) -> (PathBuf, PathBuf) {
        let dir = &self.dir;
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{leaf}.key"),
                "-out",
                &format!("{leaf}.csr"),
                "-subj",
                &format!("/CN={leaf}"),
            ],
        );
        std::fs::write(
            dir.join(format!("{leaf}.ext")),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n",
                sans.join(",")
            ),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{leaf}.csr"),
                "-CA",
                &format!("{}.pem", self.name),
                "-CAkey",
                &format!("{}.key", self.name),
                "-CAcreateserial",
                "-out",
                &format!("{leaf}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{leaf}.ext"),
            ],
        );
        (
            dir.join(format!("{leaf}.pem")),
            dir.join(format!("{leaf}.key")),
        )
    }
}
