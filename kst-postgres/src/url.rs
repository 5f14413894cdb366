//! Connection URL helpers.

/// `url` (`postgres://user:pw@host:port/db?params`) with its database name replaced by `db`
/// (added when it has none); the query parameters are kept. For tools and tests that make a
/// throwaway database next to the one configured.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_or_adds_the_database_and_keeps_the_query() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5432/test", "kst_x"),
            "postgres://u:p@127.0.0.1:5432/kst_x"
        );
        assert_eq!(
            with_database("postgres://127.0.0.1", "kst_x"),
            "postgres://127.0.0.1/kst_x"
        );
        assert_eq!(
            with_database("postgres://h/test?sslmode=disable", "d"),
            "postgres://h/d?sslmode=disable"
        );
    }
}
