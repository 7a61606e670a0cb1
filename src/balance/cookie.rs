//! Cookie affinity with no table in the proxy. The cookie carries a signed token:
//!
//! ```text
//! base64url( version:1 | backend_id:8 | issued_at:8 (unix seconds, big endian) | HMAC-SHA256:32 )
//! ```
//!
//! `backend_id` is the first 8 bytes of HMAC-SHA256(secret, "backend:" + address): it does not
//! reveal the address, does not depend on the backend's position or weight, and any instance with
//! the same secret derives the same id. The MAC covers the first 17 bytes. Every secret verifies;
//! the first signs, and a cookie verified under an older secret is re-signed with the first.
//!
//! Verifying costs a base64 decode and an HMAC, several times a Maglev lookup. A returning client
//! sends the same cookie on every request, so verified tokens are remembered in a small cache keyed
//! by the cookie's exact text (compared whole, so a forged cookie can never hit another's entry);
//! expiry is still checked on every hit.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use cookie::{Cookie, SameSite};
use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::Sha256;

use super::{Affinity, Candidates, Choice, Member, RequestFacts, Strategy};
use crate::config::CookieConfig;

/// The token format's version byte.
pub const TOKEN_COOKIE_VERSION: u8 = 1;
const BODY_LEN: usize = 1 + 8 + 8;
const TOKEN_LEN: usize = BODY_LEN + 32;
/// The token's length in base64url without padding.
const ENCODED_LEN: usize = (TOKEN_LEN * 4).div_ceil(3);
/// Verified tokens remembered per pool (a power of two); a slot holds the last token hashed to it.
const CACHE_SLOTS: usize = 4096;
/// A token issued this far in the future (clock skew between instances) is still accepted.
const MAX_CLOCK_SKEW: u64 = 300;

type HmacSha256 = Hmac<Sha256>;

/// One secret, keyed once, with the ids it gives every member.
#[derive(Debug)]
struct Key {
    mac: HmacSha256,
    ids: HashMap<u64, usize>,
    member_ids: Vec<u64>,
}

/// Sticky sessions through a signed cookie; clients without a valid one are placed by `fallback`.
#[derive(Debug)]
pub struct CookieAffinity {
    name: String,
    keys: Vec<Key>,
    fallback: Box<dyn Strategy>,
    max_age: Option<Duration>,
    secure: bool,
    keep_draining: bool,
    cache: Box<[Mutex<Option<Verified>>]>,
    /// Random per instance, so that nobody can aim cookies at one slot to evict others' entries.
    cache_seed: u64,
}

/// A cache entry: a cookie value whose MAC verified, what it says, and the member it names.
#[derive(Debug)]
struct Verified {
    text: [u8; ENCODED_LEN],
    token: Token,
    index: Option<usize>,
}

/// A verified token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Token {
    key: usize,
    id: u64,
    issued: u64,
}

impl CookieAffinity {
    /// Builds the id tables for every one of `members` (draining ones included) under every secret.
    /// `fallback` places new clients; with `keep_draining`, holders of a draining backend's cookie
    /// stay there until its drain ends.
    pub fn new(
        config: &CookieConfig,
        members: &[Member],
        fallback: Box<dyn Strategy>,
        keep_draining: bool,
    ) -> Self {
        let keys = config
            .secrets
            .iter()
            .map(|secret| {
                let mac =
                    HmacSha256::new_from_slice(secret.expose()).expect("HMAC takes any key length");
                let member_ids: Vec<u64> = members
                    .iter()
                    .map(|m| backend_id(&mac, &m.spec.address.to_string()))
                    .collect();
                let ids = member_ids
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| (id, i))
                    .collect();
                Key {
                    mac,
                    ids,
                    member_ids,
                }
            })
            .collect();
        CookieAffinity {
            name: config.name.clone(),
            keys,
            fallback,
            max_age: config.max_age,
            secure: config.secure,
            keep_draining,
            cache: (0..CACHE_SLOTS).map(|_| Mutex::new(None)).collect(),
            cache_seed: std::collections::hash_map::RandomState::new().hash_one(0u64),
        }
    }

    /// A signed token naming member `index`, issued at `issued` (unix seconds).
    pub fn token_for(&self, index: usize, issued: u64) -> String {
        let key = &self.keys[0];
        let mut raw = [0u8; TOKEN_LEN];
        raw[0] = TOKEN_COOKIE_VERSION;
        raw[1..9].copy_from_slice(&key.member_ids[index].to_be_bytes());
        raw[9..17].copy_from_slice(&issued.to_be_bytes());
        let mut mac = key.mac.clone();
        mac.update(&raw[..BODY_LEN]);
        raw[BODY_LEN..].copy_from_slice(&mac.finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The `Set-Cookie` value pinning the client to member `index`.
    pub fn set_cookie(&self, index: usize, now: u64) -> HeaderValue {
        let mut cookie = Cookie::build((self.name.as_str(), self.token_for(index, now)))
            .path("/")
            .http_only(true)
            .same_site(SameSite::Lax)
            .secure(self.secure);
        if let Some(max_age) = self.max_age {
            cookie = cookie.max_age(cookie::time::Duration::seconds(max_age.as_secs() as i64));
        }
        HeaderValue::from_str(&cookie.build().to_string())
            .expect("cookie name is validated and the token is base64url")
    }

    /// The token in `value` and the member it names, if it verifies and has not expired.
    fn verify(&self, value: &[u8], now: &Now) -> Option<(Token, Option<usize>)> {
        if value.len() != ENCODED_LEN {
            return None;
        }
        let hash = xxhash_rust::xxh3::xxh3_64_with_seed(value, self.cache_seed);
        let slot = &self.cache[(hash as usize) & (CACHE_SLOTS - 1)];
        // A busy slot is skipped, not waited for: verifying again is cheaper than contention.
        let cached = slot.try_lock().ok().and_then(|entry| {
            entry
                .as_ref()
                .filter(|e| e.text == value)
                .map(|e| (e.token, e.index))
        });
        if let Some((token, index)) = cached {
            // The clock-skew check passed when it was cached, and time only moves on.
            return self.is_young(&token, now).then_some((token, index));
        }
        let token = self.verify_mac(value)?;
        if token.issued > now.get() + MAX_CLOCK_SKEW || !self.is_young(&token, now) {
            return None;
        }
        let index = self.keys[token.key].ids.get(&token.id).copied();
        if let Ok(mut entry) = slot.try_lock() {
            let mut text = [0u8; ENCODED_LEN];
            text.copy_from_slice(value);
            *entry = Some(Verified { text, token, index });
        }
        Some((token, index))
    }

    fn verify_mac(&self, value: &[u8]) -> Option<Token> {
        let mut raw = [0u8; TOKEN_LEN + 2];
        let len = URL_SAFE_NO_PAD.decode_slice(value, &mut raw).ok()?;
        let raw = &raw[..len];
        if raw.len() != TOKEN_LEN || raw[0] != TOKEN_COOKIE_VERSION {
            return None;
        }
        let key = self.keys.iter().position(|k| {
            let mut mac = k.mac.clone();
            mac.update(&raw[..BODY_LEN]);
            mac.verify_slice(&raw[BODY_LEN..]).is_ok()
        })?;
        let id = u64::from_be_bytes(raw[1..9].try_into().ok()?);
        let issued = u64::from_be_bytes(raw[9..17].try_into().ok()?);
        Some(Token { key, id, issued })
    }

    /// Within `max_age`, if there is one (and only then is the clock read).
    fn is_young(&self, token: &Token, now: &Now) -> bool {
        self.max_age
            .is_none_or(|max_age| now.get().saturating_sub(token.issued) <= max_age.as_secs())
    }

    /// Finds this pool's cookie among the request's cookies: the first one that verifies, or
    /// `Err(())` when cookies of that name exist but none verifies.
    fn read(
        &self,
        cookies: &[HeaderValue],
        now: &Now,
    ) -> Result<Option<(Token, Option<usize>)>, ()> {
        let mut seen = false;
        for header in cookies {
            for value in cookie_values(header.as_bytes(), self.name.as_bytes()) {
                seen = true;
                if let Some(token) = self.verify(value, now) {
                    return Ok(Some(token));
                }
            }
        }
        if seen {
            Err(())
        } else {
            Ok(None)
        }
    }

    fn place(
        &self,
        request: &RequestFacts<'_>,
        candidates: &Candidates<'_>,
        affinity: Affinity,
        now: &Now,
    ) -> Option<Choice> {
        let choice = self.fallback.choose(request, candidates)?;
        Some(Choice {
            index: choice.index,
            set_cookie: Some(self.set_cookie(choice.index, now.get())),
            affinity,
        })
    }
}

fn backend_id(mac: &HmacSha256, address: &str) -> u64 {
    let mut mac = mac.clone();
    mac.update(b"backend:");
    mac.update(address.as_bytes());
    let out = mac.finalize().into_bytes();
    u64::from_be_bytes(out[..8].try_into().expect("32-byte MAC"))
}

/// The values of the cookies named `name` in one `Cookie` header (`a=1; b=2`), as bytes: a plain
/// scan, since a returning client's cookie is read on every request.
fn cookie_values<'h>(header: &'h [u8], name: &'h [u8]) -> impl Iterator<Item = &'h [u8]> + 'h {
    // The pairs between `;`s, found with memchr rather than a byte-by-byte split.
    let ends = memchr::memchr_iter(b';', header).chain(std::iter::once(header.len()));
    let mut start = 0;
    ends.filter_map(move |end| {
        let pair = header[start..end].trim_ascii();
        start = end + 1;
        let rest = pair.strip_prefix(name)?;
        let value = rest.trim_ascii_start().strip_prefix(b"=")?;
        Some(value.trim_ascii())
    })
}

/// The current Unix time, read at most once per decision and only when needed: a returning
/// client's cookie without `max_age` needs no clock at all.
#[derive(Debug, Default)]
struct Now(std::cell::Cell<Option<u64>>);

impl Now {
    fn get(&self) -> u64 {
        match self.0.get() {
            Some(now) => now,
            None => {
                let now = unix_now();
                self.0.set(Some(now));
                now
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Strategy for CookieAffinity {
    fn choose(&self, request: &RequestFacts<'_>, candidates: &Candidates<'_>) -> Option<Choice> {
        let now = Now::default();
        let (token, index) = match self.read(request.cookies, &now) {
            Ok(None) => return self.place(request, candidates, Affinity::New, &now),
            Err(()) => return self.place(request, candidates, Affinity::Invalid, &now),
            Ok(Some(found)) => found,
        };
        let Some(index) = index else {
            // Signed by us, but for a backend no longer in the pool.
            return self.place(request, candidates, Affinity::Reassigned, &now);
        };
        let usable =
            candidates.is_ready(index) || (self.keep_draining && candidates.is_draining(index));
        if !usable {
            return self.place(request, candidates, Affinity::Reassigned, &now);
        }
        // Re-sign cookies from an old secret, and slide expiry for active clients at half-life, so
        // that neither a key rotation nor max_age cuts off a user who keeps coming back.
        let stale = self
            .max_age
            .is_some_and(|age| now.get().saturating_sub(token.issued) > age.as_secs() / 2);
        let set_cookie = (token.key != 0 || stale).then(|| self.set_cookie(index, now.get()));
        Some(Choice {
            index,
            set_cookie,
            affinity: Affinity::Hit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::{facts, members};
    use crate::balance::RoundRobin;
    use crate::config::{Secret, StrategyKind};

    fn config(secrets: &[&str]) -> CookieConfig {
        CookieConfig {
            name: "sy".into(),
            secrets: secrets.iter().map(|s| Secret::new(s.as_bytes())).collect(),
            generated: false,
            fallback: StrategyKind::RoundRobin,
            max_age: None,
            secure: false,
        }
    }

    fn affinity(cfg: &CookieConfig, members: &[Member]) -> CookieAffinity {
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let fallback = Box::new(RoundRobin::new(&specs));
        CookieAffinity::new(cfg, members, fallback, true)
    }

    fn with_cookie(value: &str) -> Vec<HeaderValue> {
        vec![HeaderValue::from_str(&format!("other=1; sy={value}")).unwrap()]
    }

    fn token_of(set_cookie: &HeaderValue) -> String {
        let c = Cookie::parse(set_cookie.to_str().unwrap().to_owned()).unwrap();
        c.value().to_owned()
    }

    #[tokio::test]
    async fn a_draining_backend_keeps_its_clients_until_its_upgraded_connections_are_cut() {
        let members = members(&[1, 1]);
        let a = affinity(&config(&["0123456789abcdef"]), &members);
        let cookie = format!("sy={}", a.token_for(0, unix_now()));
        let headers = vec![HeaderValue::from_str(&cookie).unwrap()];
        // Held open so that the drain is still under way after the cut.
        let _socket = members[0].state.start_upgrade();
        crate::drain::start(&members[0].state, Duration::from_secs(60), false, |_, _| {}).unwrap();
        let c = Candidates::new(&members, 2, &[]);
        let kept = a.choose(&facts(&headers), &c).unwrap();
        assert_eq!((kept.index, kept.affinity), (0, Affinity::Hit));
        // At the deadline a WebSocket is told to go away; reconnecting, it must land elsewhere.
        members[0].state.cut_upgraded();
        let moved = a.choose(&facts(&headers), &c).unwrap();
        assert_eq!((moved.index, moved.affinity), (1, Affinity::Reassigned));
    }

    #[test]
    fn cookie_values_are_found_among_others() {
        let header = b"a=1; sy=tok1 ;sy = tok2; sya=x; xsy=y";
        let found: Vec<&[u8]> = cookie_values(header, b"sy").collect();
        assert_eq!(found, [&b"tok1"[..], &b"tok2"[..]]);
        assert_eq!(cookie_values(b"", b"sy").count(), 0);
    }

    #[test]
    fn cached_tokens_still_expire_and_an_altered_one_never_hits() {
        let at = |now: u64| Now(std::cell::Cell::new(Some(now)));
        let mut cfg = config(&["0123456789abcdef"]);
        cfg.max_age = Some(Duration::from_secs(100));
        let members = members(&[1, 1]);
        let a = affinity(&cfg, &members);
        let token = a.token_for(1, 1_000);
        for _ in 0..2 {
            assert_eq!(
                a.verify(token.as_bytes(), &at(1_050)).map(|(_, i)| i),
                Some(Some(1))
            );
        }
        assert!(
            a.verify(token.as_bytes(), &at(1_101)).is_none(),
            "expired, though cached"
        );
        let mut altered = token.clone().into_bytes();
        altered[20] = if altered[20] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(a.verify(altered.as_bytes(), &at(1_050)).is_none());
        assert!(a
            .verify(&token.as_bytes()[..token.len() - 1], &at(1_050))
            .is_none());
    }

    #[test]
    fn new_client_gets_cookie_and_sticks() {
        let members = members(&[1, 1, 1]);
        let a = affinity(&config(&["0123456789abcdef"]), &members);
        let c = Candidates::new(&members, 3, &[]);
        let first = a.choose(&facts(&[]), &c).unwrap();
        assert_eq!(first.affinity, Affinity::New);
        let sc = first.set_cookie.unwrap();
        let s = sc.to_str().unwrap();
        assert!(s.contains("HttpOnly") && s.contains("Path=/") && s.contains("SameSite=Lax"));
        let headers = with_cookie(&token_of(&sc));
        for _ in 0..20 {
            let again = a.choose(&facts(&headers), &c).unwrap();
            assert_eq!((again.index, again.affinity), (first.index, Affinity::Hit));
            assert!(again.set_cookie.is_none());
        }
    }

    #[test]
    fn tampered_cookie_is_invalid_and_replaced() {
        let members = members(&[1, 1]);
        let a = affinity(&config(&["0123456789abcdef"]), &members);
        let c = Candidates::new(&members, 2, &[]);
        let mut token = a.token_for(1, unix_now()).into_bytes();
        token[5] = if token[5] == b'A' { b'B' } else { b'A' };
        let headers = with_cookie(std::str::from_utf8(&token).unwrap());
        let choice = a.choose(&facts(&headers), &c).unwrap();
        assert_eq!(choice.affinity, Affinity::Invalid);
        assert!(choice.set_cookie.is_some());
    }

    #[test]
    fn token_does_not_depend_on_position_and_hides_address() {
        let m = members(&[1, 1, 1]);
        let reversed: Vec<Member> = m.iter().rev().cloned().collect();
        let cfg = config(&["0123456789abcdef"]);
        let a = affinity(&cfg, &m);
        let b = affinity(&cfg, &reversed);
        let token = a.token_for(0, unix_now());
        let choice = b
            .choose(
                &facts(&with_cookie(&token)),
                &Candidates::new(&reversed, 3, &[]),
            )
            .unwrap();
        assert_eq!(reversed[choice.index].spec.address, m[0].spec.address);
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        let addr = m[0].spec.address.to_string();
        assert!(!raw
            .windows(4)
            .any(|w| addr.as_bytes().windows(4).any(|x| x == w)));
    }

    #[test]
    fn rotation_old_secret_verifies_and_is_resigned() {
        let members = members(&[1, 1, 1]);
        let old = affinity(&config(&["old-secret-0123456789"]), &members);
        let rotated = affinity(
            &config(&["new-secret-0123456789", "old-secret-0123456789"]),
            &members,
        );
        let c = Candidates::new(&members, 3, &[]);
        let token = old.token_for(2, unix_now());
        let choice = rotated.choose(&facts(&with_cookie(&token)), &c).unwrap();
        assert_eq!((choice.index, choice.affinity), (2, Affinity::Hit));
        let fresh = token_of(&choice.set_cookie.expect("re-signed under the new secret"));
        let again = rotated.choose(&facts(&with_cookie(&fresh)), &c).unwrap();
        assert_eq!((again.index, again.affinity), (2, Affinity::Hit));
        assert!(again.set_cookie.is_none());
    }

    #[test]
    fn expired_token_is_invalid() {
        let members = members(&[1, 1]);
        let mut cfg = config(&["0123456789abcdef"]);
        cfg.max_age = Some(Duration::from_secs(60));
        let a = affinity(&cfg, &members);
        let c = Candidates::new(&members, 2, &[]);
        let token = a.token_for(0, unix_now() - 120);
        let choice = a.choose(&facts(&with_cookie(&token)), &c).unwrap();
        assert_eq!(choice.affinity, Affinity::Invalid);
        let fresh = a.token_for(0, unix_now() - 10);
        let hit = a.choose(&facts(&with_cookie(&fresh)), &c).unwrap();
        assert_eq!((hit.index, hit.affinity), (0, Affinity::Hit));
    }

    #[test]
    fn unavailable_pinned_backend_is_reassigned() {
        let members = members(&[1, 1, 1]);
        let a = affinity(&config(&["0123456789abcdef"]), &members);
        let token = a.token_for(1, unix_now());
        let c = Candidates::new(&members, 3, &[1]);
        let choice = a.choose(&facts(&with_cookie(&token)), &c).unwrap();
        assert_eq!(choice.affinity, Affinity::Reassigned);
        assert_ne!(choice.index, 1);
        assert!(choice.set_cookie.is_some());
    }

    #[test]
    fn max_age_and_secure_attributes_and_sliding_expiry() {
        let members = members(&[1, 1]);
        let mut cfg = config(&["0123456789abcdef"]);
        cfg.max_age = Some(Duration::from_secs(3600));
        cfg.secure = true;
        let a = affinity(&cfg, &members);
        let c = Candidates::new(&members, 2, &[]);
        let new = a.choose(&facts(&[]), &c).unwrap();
        let set = new.set_cookie.unwrap();
        let set = set.to_str().unwrap();
        assert!(
            set.contains("Max-Age=3600") && set.contains("Secure"),
            "{set}"
        );
        // Younger than half its age: no re-issue.
        let young = a.token_for(1, unix_now() - 60);
        let hit = a.choose(&facts(&with_cookie(&young)), &c).unwrap();
        assert!(hit.set_cookie.is_none());
        // Older than half its age: re-issued for the same backend, with a fresh issue time.
        let old = a.token_for(1, unix_now() - 2000);
        let hit = a.choose(&facts(&with_cookie(&old)), &c).unwrap();
        assert_eq!((hit.index, hit.affinity), (1, Affinity::Hit));
        let fresh = token_of(&hit.set_cookie.expect("sliding re-issue"));
        let again = a.choose(&facts(&with_cookie(&fresh)), &c).unwrap();
        assert_eq!(again.index, 1);
        assert!(again.set_cookie.is_none());
    }

    mod properties {
        //! The token codec under arbitrary input: never a panic, never a token that verifies
        //! under a secret it was not signed with.
        use proptest::prelude::*;

        use super::*;
        use crate::balance::Strategy;

        fn at(now: u64) -> Now {
            Now(std::cell::Cell::new(Some(now)))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any bytes — of any length, or of a token's length in its alphabet — are either
            /// no token or a token naming a member; verifying never panics.
            #[test]
            fn any_bytes_are_no_token_or_a_valid_one(
                bytes in prop::collection::vec(any::<u8>(), 0..160),
                shaped in "[A-Za-z0-9_-]{66}",
            ) {
                prop_assert_eq!(ENCODED_LEN, 66, "the shaped input's length");
                let members = members(&[1, 1, 1]);
                let mut cfg = config(&["0123456789abcdef"]);
                cfg.max_age = Some(Duration::from_secs(3600));
                let a = affinity(&cfg, &members);
                for input in [&bytes[..], shaped.as_bytes()] {
                    if let Some((_, index)) = a.verify(input, &at(1_000_000)) {
                        prop_assert!(index.is_some_and(|i| i < members.len()));
                    }
                    // Through the strategy, from a Cookie header, as a client would send it.
                    if let Ok(value) = HeaderValue::from_bytes(&[b"sy=", input].concat()) {
                        let headers = vec![value];
                        let c = Candidates::new(&members, 3, &[]);
                        let choice = a.choose(&facts(&headers), &c).unwrap();
                        prop_assert!(choice.index < members.len());
                        prop_assert_ne!(choice.affinity, Affinity::Hit);
                    }
                }
            }

            /// A token verifies under the secret that signed it, for the member it names, and
            /// under no other secret; changing any one of its characters spoils it.
            #[test]
            fn a_token_verifies_only_under_its_own_secret(
                signer in "[ -~]{16,40}",
                other in "[ -~]{16,40}",
                member in 0usize..3,
                issued in 0u64..4_000_000_000,
                position in 0usize..66,
                replacement in "[A-Za-z0-9_-]",
            ) {
                prop_assume!(signer != other);
                let members = members(&[1, 1, 1]);
                let signed = affinity(&config(&[signer.as_str()]), &members);
                let token = signed.token_for(member, issued);
                let now = at(issued);
                prop_assert_eq!(signed.verify(token.as_bytes(), &now).map(|(_, i)| i), Some(Some(member)));
                let stranger = affinity(&config(&[other.as_str()]), &members);
                prop_assert!(stranger.verify(token.as_bytes(), &now).is_none());
                let mut altered = token.clone().into_bytes();
                altered[position] = replacement.as_bytes()[0];
                prop_assume!(altered != token.as_bytes());
                prop_assert!(signed.verify(&altered, &now).is_none());
            }
        }
    }
}
