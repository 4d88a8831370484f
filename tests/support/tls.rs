//! Throwaway certificates for the TLS tests, made with the `openssl` command
//! line tool in a temporary directory: a CA, server certificates for chosen
//! names, client certificates. Each [`TestCa`] is independent, so a second CA
//! stands for "a CA nobody configured". ECDSA P-256 keys: quick to generate
//! on a busy machine, and accepted by rustls, PostgreSQL and Redis alike.
//!
//! A missing `openssl` is a test failure with a clear message, never a skip.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use tempfile::TempDir;

/// Validity of every certificate made here; the tests finish long before.
const DAYS: &str = "2";

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority that lives as long as the value.
pub struct TestCa {
    dir: TempDir,
    name: String,
    serial: AtomicU32,
}

impl TestCa {
    /// A new self-signed CA called `name`.
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("croupier-ca-")
            .tempdir()
            .expect("creating a temporary directory for certificates");
        let ca = TestCa {
            dir,
            name: name.to_owned(),
            serial: AtomicU32::new(1),
        };
        openssl(
            ca.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                DAYS,
                "-subj",
                &format!("/CN={name} test CA"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        );
        ca
    }

    /// The CA certificate (what `sslrootcert` / `REDIS_CA_CERT` point at).
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The directory the files live in (for placing other test files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `names` (`DNS:localhost`, `IP:127.0.0.1`...).
    pub fn server(&self, file_stem: &str, names: &[&str]) -> CertPair {
        let san = names.join(",");
        self.issue(
            file_stem,
            &format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
        )
    }

    /// A client certificate (for servers that require one).
    pub fn client(&self, file_stem: &str) -> CertPair {
        self.issue(file_stem, "extendedKeyUsage=clientAuth\n")
    }

    fn issue(&self, stem: &str, extensions: &str) -> CertPair {
        let dir = self.dir.path();
        let ext = format!(
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n{extensions}"
        );
        fs::write(dir.join(format!("{stem}.ext")), ext).expect("writing the extensions file");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={stem} ({})", self.name),
                "-keyout",
                &format!("{stem}.key"),
                "-out",
                &format!("{stem}.csr"),
            ],
        );
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{stem}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial.to_string(),
                "-days",
                DAYS,
                "-extfile",
                &format!("{stem}.ext"),
                "-out",
                &format!("{stem}.pem"),
            ],
        );
        CertPair {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running openssl ({e}): install the Debian package `openssl`; the TLS tests need it"
            )
        });
    assert!(
        output.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}
