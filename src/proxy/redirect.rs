//! `redirect_https`: a plain listener answers every request with `308 Permanent Redirect` to the
//! same URL over https. 308 rather than 301 so that clients repeat the method and body as they
//! were (RFC 9110 §15.4.9).

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{HeaderMap, Response, StatusCode, Uri};

use super::ProxyBody;
use crate::error::ProxyError;

/// Where a plain listener sends its clients: the request's host, on `port` (none: the default,
/// 443).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpsRedirect {
    port: Option<u16>,
}

impl HttpsRedirect {
    /// Redirects to `port`, the first TLS listener's; with none (no TLS listener, or port 443)
    /// the URL names no port.
    pub fn to_port(port: Option<u16>) -> Self {
        HttpsRedirect {
            port: port.filter(|&port| port != 443),
        }
    }

    /// The redirect for a request: `https://HOST[:port]/path?query`, HOST from the request target
    /// (HTTP/2, absolute form) or the `Host` header, without its port. A request with no valid
    /// host gets `400`: there is no URL to send it to.
    pub fn respond(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let missing = ProxyError::BadRequest {
            reason: "missing or invalid Host header",
        };
        let authority = match uri.authority() {
            Some(authority) => authority.clone(),
            None => headers
                .get(header::HOST)
                .and_then(|host| Authority::try_from(host.as_bytes()).ok())
                .ok_or(missing)?,
        };
        // `host()` keeps an IPv6 address's brackets.
        let host = authority.host();
        // `OPTIONS *` names the server, not a resource: its https counterpart is the root.
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| *p != "*")
            .unwrap_or("/");
        let location = match self.port {
            Some(port) => format!("https://{host}:{port}{path}"),
            None => format!("https://{host}{path}"),
        };
        let location = HeaderValue::try_from(location).map_err(|_| ProxyError::BadRequest {
            reason: "missing or invalid Host header",
        })?;
        let mut response = Response::new(ProxyBody::empty());
        *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
        response.headers_mut().insert(header::LOCATION, location);
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(redirect: HttpsRedirect, uri: &str, host: Option<&str>) -> Option<String> {
        let mut headers = HeaderMap::new();
        if let Some(host) = host {
            headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        }
        let response = redirect.respond(&uri.parse().unwrap(), &headers).ok()?;
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        Some(
            response.headers()[header::LOCATION]
                .to_str()
                .unwrap()
                .to_owned(),
        )
    }

    #[test]
    fn options_star_goes_to_the_root() {
        assert_eq!(
            location(HttpsRedirect::to_port(None), "*", Some("a.example")).as_deref(),
            Some("https://a.example/")
        );
    }

    #[test]
    fn keeps_host_path_and_query_and_swaps_the_port() {
        let to_8443 = HttpsRedirect::to_port(Some(8443));
        assert_eq!(
            location(to_8443, "/a/b?c=d", Some("shop.example:8080")).as_deref(),
            Some("https://shop.example:8443/a/b?c=d")
        );
        let default = HttpsRedirect::to_port(Some(443));
        assert_eq!(
            location(default, "/", Some("shop.example")).as_deref(),
            Some("https://shop.example/")
        );
        assert_eq!(HttpsRedirect::to_port(None), default);
        assert_eq!(
            location(default, "/x", Some("[::1]:80")).as_deref(),
            Some("https://[::1]/x")
        );
        // HTTP/2 and absolute form carry the host in the target.
        assert_eq!(
            location(to_8443, "http://h2.example:80/p", None).as_deref(),
            Some("https://h2.example:8443/p")
        );
    }

    #[test]
    fn no_usable_host_is_a_bad_request() {
        let redirect = HttpsRedirect::to_port(None);
        assert_eq!(location(redirect, "/", None), None);
        assert_eq!(location(redirect, "/", Some("evil.example/x")), None);
        assert_eq!(location(redirect, "/", Some("a b")), None);
    }
}
