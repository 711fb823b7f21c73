//! A small HTTP/1.1 client that speaks like the device libraries do: one request per
//! connection (`Connection: close`), headers written exactly as given, `Content-Length`
//! bodies read as they arrive so a download can stop, resume and be checked piecewise.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Why a request failed. `Network` errors are worth a retry; the others are answers.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("network error: {0}")]
    Network(String),
    #[error("malformed answer: {0}")]
    Protocol(String),
    #[error("bad url {0:?}: only http://host[:port]/path is supported")]
    Url(String),
}

impl From<std::io::Error> for HttpError {
    fn from(e: std::io::Error) -> Self {
        HttpError::Network(e.to_string())
    }
}

/// `http://host:port/prefix` split into what a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, HttpError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| HttpError::Url(url.to_string()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| HttpError::Url(url.to_string()))?),
            None => (authority, 80),
        };
        if host.is_empty() {
            return Err(HttpError::Url(url.to_string()));
        }
        Ok(Url {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// The same server with another path.
    pub fn with_path(&self, path: &str) -> Url {
        Url {
            path: path.to_string(),
            ..self.clone()
        }
    }
}

/// An answer whose body has not been read yet.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub content_length: Option<u64>,
    reader: BufReader<TcpStream>,
    remaining: u64,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Reads the next piece of the body (empty at the end). A connection that closes before
    /// `Content-Length` bytes arrived is a `Network` error.
    pub async fn chunk(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, HttpError> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = tokio::time::timeout(timeout, self.reader.read(&mut buf[..want]))
            .await
            .map_err(|_| HttpError::Network("timed out reading the body".into()))??;
        if n == 0 {
            return Err(HttpError::Network(format!(
                "connection closed with {} body bytes missing",
                self.remaining
            )));
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// Reads the whole (small) body.
    pub async fn text(mut self, timeout: Duration) -> Result<String, HttpError> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        if self.content_length.is_none() {
            tokio::time::timeout(timeout, self.reader.read_to_end(&mut out))
                .await
                .map_err(|_| HttpError::Network("timed out reading the body".into()))??;
        } else {
            loop {
                let n = self.chunk(&mut buf, timeout).await?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8(out).map_err(|_| HttpError::Protocol("the body is not UTF-8".into()))
    }
}

/// Sends `method url` with the extra header lines (each `Name: value`) and reads the head.
pub async fn request(
    method: &str,
    url: &Url,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<Response, HttpError> {
    let connect = TcpStream::connect((url.host.as_str(), url.port));
    let stream = tokio::time::timeout(timeout, connect).await.map_err(|_| {
        HttpError::Network(format!("timed out connecting to {}:{}", url.host, url.port))
    })??;
    stream.set_nodelay(true)?;
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}:{}\r\n",
        url.path, url.host, url.port
    );
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    tokio::time::timeout(timeout, reader.get_mut().write_all(head.as_bytes()))
        .await
        .map_err(|_| HttpError::Network("timed out sending the request".into()))??;
    let read_head = async {
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        let status: u16 = line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HttpError::Protocol(format!("status line {:?}", line.trim_end())))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                return Err(HttpError::Network(
                    "connection closed in the headers".into(),
                ));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if headers.len() > 100 {
                return Err(HttpError::Protocol("too many headers".into()));
            }
            let (name, value) = l
                .split_once(':')
                .ok_or_else(|| HttpError::Protocol(format!("header line {l:?}")))?;
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
        Ok::<_, HttpError>((status, headers))
    };
    let (status, headers) = tokio::time::timeout(timeout, read_head)
        .await
        .map_err(|_| HttpError::Network("timed out waiting for the answer".into()))??;
    let content_length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok());
    let remaining = if method == "HEAD" || status == 304 || status == 204 {
        0
    } else {
        content_length.unwrap_or(u64::MAX)
    };
    Ok(Response {
        status,
        headers,
        content_length,
        reader,
        remaining,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:8080/ota/1/bot").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/ota/1/bot")
        );
        let u = Url::parse("http://example.com").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        assert!(Url::parse("https://example.com").is_err());
        assert!(Url::parse("http://:80/").is_err());
        assert!(Url::parse("http://h:notaport/").is_err());
    }
}
