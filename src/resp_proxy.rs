//! A proxy in front of a real Redis that makes it answer one command the way another Redis
//! would, and counts the commands it passes: for tests of what the store does against a server
//! older than the one here.
//!
//! A rewritten command still goes to Redis, so its answer (an error) comes back in order with
//! the others, however the client pipelines them.

use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// What the proxy does to a `SET` that carries both `NX` and `GET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetNxGet {
    /// Refused with `ERR syntax error`, as Redis 6 refuses it (it takes `NX` or `GET`, not
    /// both); `SSUBSCRIBE` is an unknown command, as it is there.
    RefusedLikeRedis6,
    /// Only the first one is refused, with an error that says nothing of the syntax (`ERR invalid
    /// expire time`); the rest pass.
    FirstFailsOtherwise,
}

/// The counts of what passed through.
#[derive(Debug, Default)]
pub struct Seen {
    /// `SET` commands with `NX` and `GET`, whatever became of them.
    pub set_nx_get: AtomicUsize,
    /// `EVALSHA` and `EVAL` commands: the store's scripts.
    pub scripts: AtomicUsize,
}

/// A proxy on 127.0.0.1, on a free port, to the Redis at `upstream` (`host:port`). Dropping it
/// stops accepting connections.
#[derive(Debug)]
pub struct RespProxy {
    address: SocketAddr,
    seen: Arc<Seen>,
    accepting: JoinHandle<()>,
}

impl RespProxy {
    /// Starts a proxy that treats `SET .. NX .. GET` as `behaviour` says.
    pub async fn start(upstream: &str, behaviour: SetNxGet) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let seen = Arc::new(Seen::default());
        let upstream = upstream.to_owned();
        let refusals = Arc::new(AtomicUsize::new(match behaviour {
            SetNxGet::RefusedLikeRedis6 => usize::MAX,
            SetNxGet::FirstFailsOtherwise => 1,
        }));
        let accepting = tokio::spawn({
            let seen = Arc::clone(&seen);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (seen, refusals, upstream) =
                        (Arc::clone(&seen), Arc::clone(&refusals), upstream.clone());
                    tokio::spawn(async move {
                        if let Err(error) =
                            relay(client, &upstream, behaviour, &seen, &refusals).await
                        {
                            eprintln!("resp proxy: a connection ended: {error}");
                        }
                    });
                }
            }
        });
        Ok(Self {
            address,
            seen,
            accepting,
        })
    }

    /// The proxy's URL.
    pub fn url(&self) -> String {
        format!("redis://{}", self.address)
    }

    /// What passed through so far.
    pub fn seen(&self) -> &Seen {
        &self.seen
    }
}

impl Drop for RespProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Relays one client connection: commands up, rewritten where asked; answers down as they come.
async fn relay(
    client: TcpStream,
    upstream: &str,
    behaviour: SetNxGet,
    seen: &Seen,
    refusals: &AtomicUsize,
) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    let (client_read, mut client_write) = client.into_split();
    let (mut server_read, server_write) = server.into_split();
    let answers = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });
    let relayed = relay_commands(client_read, server_write, behaviour, seen, refusals).await;
    if relayed.is_err() {
        answers.abort();
    }
    relayed
}

/// The client's commands, up to the server, rewritten where asked.
async fn relay_commands(
    client_read: tokio::net::tcp::OwnedReadHalf,
    mut server_write: tokio::net::tcp::OwnedWriteHalf,
    behaviour: SetNxGet,
    seen: &Seen,
    refusals: &AtomicUsize,
) -> io::Result<()> {
    let mut commands = BufReader::new(client_read);
    while let Some(mut command) = read_command(&mut commands).await? {
        let name = command
            .first()
            .map(|name| name.to_ascii_uppercase())
            .unwrap_or_default();
        let has = |word: &[u8]| {
            command
                .iter()
                .skip(3)
                .any(|arg| arg.eq_ignore_ascii_case(word))
        };
        if name == b"SET" && has(b"NX") && has(b"GET") {
            seen.set_nx_get.fetch_add(1, Ordering::SeqCst);
            let refused = refusals
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if refused {
                command = refused_form(&command, behaviour);
            }
        } else if name == b"EVALSHA" || name == b"EVAL" {
            seen.scripts.fetch_add(1, Ordering::SeqCst);
        } else if name == b"SSUBSCRIBE" && behaviour == SetNxGet::RefusedLikeRedis6 {
            // Sharded pub/sub came with 7.0 too: an unknown command before it.
            command[0] = b"SSUBSCRIBE-BEFORE-7".to_vec();
        }
        server_write.write_all(&encode(&command)).await?;
    }
    // The client is done sending; the answers still on their way reach it.
    server_write.shutdown().await
}

/// The command Redis answers with the error the behaviour stands for.
fn refused_form(command: &[Vec<u8>], behaviour: SetNxGet) -> Vec<Vec<u8>> {
    let key_and_value = command.iter().skip(1).take(2).cloned();
    let rest: &[&[u8]] = match behaviour {
        // `NX` with `XX` is a syntax error on every version.
        SetNxGet::RefusedLikeRedis6 => &[b"NX", b"XX"],
        SetNxGet::FirstFailsOtherwise => &[b"PX", b"0"],
    };
    std::iter::once(b"SET".to_vec())
        .chain(key_and_value)
        .chain(rest.iter().map(|arg| arg.to_vec()))
        .collect()
}

/// Reads one command (a RESP array of bulk strings), or `None` at the end of the stream.
async fn read_command(
    reader: &mut (impl AsyncBufRead + Unpin),
) -> io::Result<Option<Vec<Vec<u8>>>> {
    let Some(header) = read_line(reader).await? else {
        return Ok(None);
    };
    let count = header
        .strip_prefix(b"*")
        .and_then(number)
        .ok_or_else(|| malformed("a command that is not an array"))?;
    let mut arguments = Vec::with_capacity(count);
    for _ in 0..count {
        let length = read_line(reader)
            .await?
            .as_deref()
            .and_then(|line| line.strip_prefix(b"$"))
            .and_then(number)
            .ok_or_else(|| malformed("an argument that is not a bulk string"))?;
        let mut argument = vec![0; length + 2];
        reader.read_exact(&mut argument).await?;
        argument.truncate(length);
        arguments.push(argument);
    }
    Ok(Some(arguments))
}

/// One line without its CRLF, or `None` at the end of the stream.
async fn read_line(reader: &mut (impl AsyncBufRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line).await? == 0 {
        return Ok(None);
    }
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or_else(|| malformed("a line without CRLF"))?;
    Ok(Some(line.to_vec()))
}

fn number(digits: &[u8]) -> Option<usize> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn encode(command: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = format!("*{}\r\n", command.len()).into_bytes();
    for argument in command {
        bytes.extend_from_slice(format!("${}\r\n", argument.len()).as_bytes());
        bytes.extend_from_slice(argument);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("RESP: {what}"))
}
