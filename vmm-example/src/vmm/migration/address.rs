// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where a migration goes: a unix socket (`unix:PATH`, or a bare path) or
//! TCP (`tcp:HOST:PORT`, meant for loopback or a trusted network: the
//! stream is checked, not encrypted).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::MigrationError;

/// A migration address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationAddress {
    /// A unix stream socket.
    Unix(PathBuf),
    /// TCP, `HOST:PORT`.
    Tcp(String),
}

impl FromStr for MigrationAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(hp) = s.strip_prefix("tcp:") {
            match hp.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(MigrationAddress::Tcp(hp.to_string()))
                }
                _ => Err(format!("'{s}': expected tcp:HOST:PORT")),
            }
        } else {
            let path = s.strip_prefix("unix:").unwrap_or(s);
            if path.is_empty() {
                return Err("a unix socket path is needed".into());
            }
            Ok(MigrationAddress::Unix(path.into()))
        }
    }
}

impl std::fmt::Display for MigrationAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationAddress::Tcp(hp) => write!(f, "tcp:{hp}"),
        }
    }
}

/// One end of a migration connection.
#[derive(Debug)]
pub enum Connection {
    /// Over a unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Connection {
    /// Limit how long a read may block (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.set_read_timeout(timeout),
            Connection::Tcp(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Connection {
    /// Limit how long a write may block (`None`: forever): a destination
    /// that stops reading must not hold the source forever.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.set_write_timeout(timeout),
            Connection::Tcp(s) => s.set_write_timeout(timeout),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.read(buf),
            Connection::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.write(buf),
            Connection::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.flush(),
            Connection::Tcp(s) => s.flush(),
        }
    }
}

/// A destination waiting for its source.
#[derive(Debug)]
pub enum MigrationListener {
    /// On a unix socket (removed again on drop).
    Unix(UnixListener, PathBuf),
    /// On TCP.
    Tcp(TcpListener),
}

impl MigrationAddress {
    /// Connect to a destination listening here.
    pub fn connect(&self) -> Result<Connection, MigrationError> {
        let err = |source| MigrationError::Connect {
            what: "connect to",
            address: self.to_string(),
            source,
        };
        Ok(match self {
            MigrationAddress::Unix(p) => Connection::Unix(UnixStream::connect(p).map_err(err)?),
            MigrationAddress::Tcp(hp) => {
                let s = TcpStream::connect(hp.as_str()).map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                Connection::Tcp(s)
            }
        })
    }

    /// Listen here for a source. A unix socket path must not exist yet.
    pub fn listen(&self) -> Result<MigrationListener, MigrationError> {
        let err = |source| MigrationError::Connect {
            what: "listen on",
            address: self.to_string(),
            source,
        };
        Ok(match self {
            MigrationAddress::Unix(p) => {
                MigrationListener::Unix(UnixListener::bind(p).map_err(err)?, p.clone())
            }
            MigrationAddress::Tcp(hp) => {
                MigrationListener::Tcp(TcpListener::bind(hp.as_str()).map_err(err)?)
            }
        })
    }
}

impl MigrationListener {
    /// Wait for the source.
    pub fn accept(&self) -> io::Result<Connection> {
        Ok(match self {
            MigrationListener::Unix(l, _) => Connection::Unix(l.accept()?.0),
            MigrationListener::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Connection::Tcp(s)
            }
        })
    }
}

impl Drop for MigrationListener {
    fn drop(&mut self) {
        if let MigrationListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "unix:/tmp/m.sock".parse(),
            Ok(MigrationAddress::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "/tmp/m.sock".parse(),
            Ok(MigrationAddress::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse(),
            Ok(MigrationAddress::Tcp("127.0.0.1:4444".into()))
        );
        for bad in ["tcp:127.0.0.1", "tcp::4", "tcp:h:70000", "unix:", ""] {
            assert!(bad.parse::<MigrationAddress>().is_err(), "{bad}");
        }
    }
}
