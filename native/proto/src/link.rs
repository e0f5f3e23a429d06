//! Per-link state and the one function that decides what happens to each packet a peer
//! sends on an established link.
//!
//! A link is *full* when the peer's tier is at least ours (ordinary distribution) and
//! *restricted* when it is below. Full links pass packets untouched; every packet of a
//! restricted link is judged by [`crate::filter::LinkFilter::decide`].

/// Tiers in their configured order, highest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierOrder(Vec<String>);

impl TierOrder {
    /// Fails with the offending name if a tier is listed twice or the list is empty.
    pub fn new(tiers: Vec<String>) -> Result<Self, String> {
        if tiers.is_empty() {
            return Err("the tier list is empty".into());
        }
        for (i, t) in tiers.iter().enumerate() {
            if !crate::cert::is_valid_tier(t) {
                return Err(format!("tier {t:?} is not a valid tier name"));
            }
            if tiers[..i].contains(t) {
                return Err(format!("tier {t:?} is listed twice"));
            }
        }
        Ok(TierOrder(tiers))
    }

    /// 0 is the highest tier.
    pub fn rank(&self, tier: &str) -> Option<usize> {
        self.0.iter().position(|t| t == tier)
    }

    pub fn tiers(&self) -> &[String] {
        &self.0
    }

    /// The mode of a link from a node of `local` tier to a peer of `peer` tier.
    pub fn mode(&self, local: &str, peer: &str) -> Option<LinkMode> {
        let (l, p) = (self.rank(local)?, self.rank(peer)?);
        Some(if p <= l {
            LinkMode::Full
        } else {
            LinkMode::Restricted
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// The peer's tier is at least ours: ordinary Distributed Erlang.
    Full,
    /// The peer's tier is below ours: its packets are decoded and checked.
    Restricted,
}

impl LinkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkMode::Full => "full",
            LinkMode::Restricted => "restricted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> TierOrder {
        TierOrder::new(vec!["admin".into(), "worker".into(), "edge".into()]).expect("valid")
    }

    #[test]
    fn higher_and_equal_peers_get_full_links() {
        let o = order();
        assert_eq!(o.mode("worker", "admin"), Some(LinkMode::Full));
        assert_eq!(o.mode("worker", "worker"), Some(LinkMode::Full));
        assert_eq!(o.mode("worker", "edge"), Some(LinkMode::Restricted));
        assert_eq!(o.mode("admin", "edge"), Some(LinkMode::Restricted));
        assert_eq!(o.mode("admin", "ghost"), None);
    }

    #[test]
    fn tier_lists_are_validated() {
        assert!(TierOrder::new(vec![]).is_err());
        assert!(TierOrder::new(vec!["a".into(), "a".into()]).is_err());
        assert!(TierOrder::new(vec!["Admin".into()]).is_err());
    }
}
