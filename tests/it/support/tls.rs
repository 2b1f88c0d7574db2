//! TLS for the integration tests: a throwaway certificate authority ([`TestCa`], made with
//! the `openssl` command line tool, so no crate is compiled for it) and a TLS-terminating
//! loopback proxy ([`TlsProxy`], tokio-rustls) that puts HTTPS in front of a plain server
//! such as Garage.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Certificates are valid this long: the test only needs them for minutes.
const VALID_DAYS: &str = "2";

/// A certificate authority in a temp dir, and the certificates it issued.
pub struct TestCa {
    dir: tempfile::TempDir,
    name: String,
}

/// A certificate and its private key (PEM files), issued by a [`TestCa`].
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA (P-256 key, self-signed) called `name`.
    pub async fn new(name: &str) -> Result<TestCa> {
        let dir = tempfile::Builder::new()
            .prefix("pgferry-ca-")
            .tempdir()
            .context("cannot create a temp dir for the test CA")?;
        let ca = TestCa {
            dir,
            name: name.to_string(),
        };
        openssl(
            ca.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                VALID_DAYS,
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )
        .await?;
        Ok(ca)
    }

    /// The CA certificate (PEM): what `sslrootcert` and `ca_file` point at.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a server (and client) certificate for `common_name` whose subjectAltNames are
    /// `sans`, in openssl syntax: `["DNS:localhost", "IP:127.0.0.1"]`. The key file is 0600.
    pub async fn issue(&self, common_name: &str, sans: &[&str]) -> Result<Issued> {
        let base = super::unique_name(common_name);
        let dir = self.dir.path();
        let ext = dir.join(format!("{base}.ext"));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={}\n",
                sans.join(",")
            ),
        )
        .context("cannot write the extensions file")?;
        let (key, csr, cert) = (
            format!("{base}.key"),
            format!("{base}.csr"),
            format!("{base}.pem"),
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={common_name}"),
            ],
        )
        .await?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                VALID_DAYS,
                "-extfile",
                &format!("{base}.ext"),
                "-out",
                &cert,
            ],
        )
        .await
        .with_context(|| format!("{} cannot issue a certificate", self.name))?;
        // libpq refuses a client key that group or others can read.
        std::fs::set_permissions(
            dir.join(&key),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .context("cannot chmod the key")?;
        Ok(Issued {
            cert: dir.join(cert),
            key: dir.join(key),
        })
    }
}

async fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .context("cannot run `openssl`: install it (apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// An HTTPS endpoint on 127.0.0.1 forwarding every connection, decrypted, to `upstream`.
/// Stops (and drops its connections) on drop.
pub struct TlsProxy {
    port: u16,
    task: JoinHandle<()>,
}

impl TlsProxy {
    /// Listens on a free port of 127.0.0.1 with `cert`, forwarding to `upstream`.
    pub async fn start(cert: &Issued, upstream: SocketAddr) -> Result<TlsProxy> {
        let chain = CertificateDer::pem_file_iter(&cert.cert)
            .context("read the proxy certificate")?
            .collect::<Result<Vec<_>, _>>()
            .context("parse the proxy certificate")?;
        let key = PrivateKeyDer::from_pem_file(&cert.key).context("read the proxy key")?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the proxy's certificate and key do not match")?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("bind the TLS proxy")?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    // A client that refuses our certificate ends here: that is the point.
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        Ok(TlsProxy { port, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
