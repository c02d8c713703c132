//! Real TLS servers for the tests, each private to its test and stopped when dropped: a private
//! CA with certificates made by `openssl`, a `redis-server` listening on TLS only, and a
//! PostgreSQL cluster of its own (`initdb`) accepting TLS connections only.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A directory of its own under the system's temporary directory, deleted when dropped.
#[derive(Debug)]
pub struct ScratchDirectory(PathBuf);

impl ScratchDirectory {
    /// Makes a new, empty directory named after `purpose`.
    pub fn new(purpose: &str) -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "idempotency-{purpose}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private CA, a certificate it signed for `localhost` and `127.0.0.1` (for servers, and for
/// cluster nodes, which are clients of each other too), a client certificate it signed, and a
/// second CA that signed none of them.
#[derive(Debug)]
pub struct TestCertificates {
    directory: ScratchDirectory,
}

impl TestCertificates {
    /// Makes them with `openssl` (P-256 keys, valid for two days).
    pub fn make() -> std::io::Result<Self> {
        let directory = ScratchDirectory::new("tls")?;
        let dir = directory.path();
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            openssl(
                dir,
                &["req", "-x509"],
                &key,
                &[
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=idempotency-actix test {ca}"),
                ],
            )?;
        }
        for (name, subject) in [
            ("server", "/CN=localhost"),
            ("client", "/CN=idempotency client"),
        ] {
            openssl(
                dir,
                &["req"],
                &key,
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    subject,
                ],
            )?;
            openssl(
                dir,
                &["x509", "-req"],
                &[],
                &[
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            )?;
        }
        Ok(Self { directory })
    }

    /// The path of one of the files: `ca.pem`, `other-ca.pem`, `server.pem`, `server.key`,
    /// `client.pem`, `client.key`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }

    /// The contents of one of the files.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.file(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

fn openssl(dir: &Path, command: &[&str], key: &[&str], rest: &[&str]) -> std::io::Result<()> {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(command)
        .args(key)
        .args(rest)
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(std::io::Error::other(format!(
            "openssl {}: {}",
            command.join(" "),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(())
}

/// Whether `openssl` is installed, to make the certificates.
pub fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `redis-server` listening on TLS only, on a free port; killed when dropped.
#[derive(Debug)]
pub struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    /// Starts one with the server certificate of `certificates`; with `clients_must_present`,
    /// it refuses clients without a certificate its CA signed.
    pub fn start(
        certificates: &TestCertificates,
        clients_must_present: bool,
    ) -> std::io::Result<Self> {
        let port = free_port()?;
        let path = |name: &str| certificates.file(name).display().to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--tls-port",
                &port.to_string(),
            ])
            .args(["--tls-cert-file", &path("server.pem")])
            .args(["--tls-key-file", &path("server.key")])
            .args(["--tls-ca-cert-file", &path("ca.pem")])
            .args([
                "--tls-auth-clients",
                if clients_must_present { "yes" } else { "no" },
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()?;
        let mut server = Self { port, child };
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(std::io::Error::other(format!(
                    "redis-server exited ({status}): is it built with TLS?"
                )));
            }
            if started.elapsed() > Duration::from_secs(5) {
                return Err(std::io::Error::other(
                    "redis-server did not listen on its TLS port",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// Its URL, by name (the certificate's name): `rediss://localhost:PORT`.
    pub fn url(&self) -> String {
        format!("rediss://localhost:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory of PostgreSQL's server programs (`initdb`, `pg_ctl`), if installed.
pub fn postgres_programs() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop()
}

/// A PostgreSQL cluster of its own (`initdb` as the `postgres` user, into a scratch
/// directory) on a free port, accepting TLS connections only (`hostssl` in `pg_hba.conf`),
/// with the server certificate of a [`TestCertificates`]; stopped when dropped.
#[derive(Debug)]
pub struct TlsPostgres {
    port: u16,
    programs: PathBuf,
    data: PathBuf,
    _directory: ScratchDirectory,
}

impl TlsPostgres {
    /// Creates and starts it (a few seconds).
    pub fn start(certificates: &TestCertificates, programs: &Path) -> std::io::Result<Self> {
        let directory = ScratchDirectory::new("pg-tls")?;
        let data = directory.path().join("data");
        run(
            &["chown", "-R", "postgres:postgres", &shown(directory.path())],
            As::Root,
        )?;
        run(
            &[
                &shown(&programs.join("initdb")),
                "-D",
                &shown(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
            As::Postgres,
        )?;
        for name in ["server.pem", "server.key"] {
            std::fs::copy(certificates.file(name), data.join(name))?;
        }
        let port = free_port()?;
        let mut settings = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(
            &mut settings,
            format!(
                "\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{}'\nssl = on\n\
                 ssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\nfsync = off\n",
                directory.path().display()
            )
            .as_bytes(),
        )?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )?;
        run(
            &["chown", "-R", "postgres:postgres", &shown(directory.path())],
            As::Root,
        )?;
        run(
            &["chmod", "600", &shown(&data.join("server.key"))],
            As::Root,
        )?;
        run(
            &[
                &shown(&programs.join("pg_ctl")),
                "-D",
                &shown(&data),
                "-l",
                &shown(&directory.path().join("log")),
                "-w",
                "start",
            ],
            As::Postgres,
        )?;
        Ok(Self {
            port,
            programs: programs.to_path_buf(),
            data,
            _directory: directory,
        })
    }

    /// A URL for database `postgres` on it, by name (the certificate's name), with these
    /// query parameters (`sslmode=..&sslrootcert=..`).
    pub fn url(&self, parameters: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/postgres?{parameters}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = run(
            &[
                &shown(&self.programs.join("pg_ctl")),
                "-D",
                &shown(&self.data),
                "-m",
                "immediate",
                "stop",
            ],
            As::Postgres,
        );
    }
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// Who runs a command.
#[derive(Debug, Clone, Copy)]
enum As {
    /// This process's user (root, to hand files over).
    Root,
    /// The `postgres` user: PostgreSQL refuses to run as root.
    Postgres,
}

fn run(command: &[&str], who: As) -> std::io::Result<()> {
    let output = match who {
        As::Root => Command::new(command[0]).args(&command[1..]).output()?,
        As::Postgres => Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(command)
            .output()?,
    };
    if !output.status.success() {
        return Err(std::io::Error::other(format!(
            "{}: {}",
            command.join(" "),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(())
}
