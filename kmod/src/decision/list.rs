//! A list of at most `N` reasons, without allocation: how a refusal names *every* unmet
//! condition in a layer that may not allocate.

use core::fmt;

/// Up to `N` items in the order they were added.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReasonList<T: Copy, const N: usize> {
    items: [Option<T>; N],
    len: u8,
}

impl<T: Copy, const N: usize> ReasonList<T, N> {
    /// An empty list.
    pub const fn new() -> Self {
        Self {
            items: [None; N],
            len: 0,
        }
    }

    /// Appends `item`; returns `false` (and drops it) when the list is full. Lists are sized
    /// for every reason their producer can give, so that does not happen.
    pub fn push(&mut self, item: T) -> bool {
        match self.items.get_mut(usize::from(self.len)) {
            Some(slot) => {
                *slot = Some(item);
                self.len = self.len.saturating_add(1);
                true
            }
            None => false,
        }
    }

    /// Items held.
    pub const fn len(&self) -> usize {
        self.len as usize
    }

    /// No item.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The item at `index`.
    pub fn get(&self, index: usize) -> Option<&T> {
        self.items.get(index).and_then(Option::as_ref)
    }

    /// The items in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.items.iter().flatten()
    }
}

impl<T: Copy + PartialEq, const N: usize> ReasonList<T, N> {
    /// `item` is in the list.
    pub fn contains(&self, item: &T) -> bool {
        self.iter().any(|i| i == item)
    }
}

impl<T: Copy, const N: usize> Default for ReasonList<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + fmt::Debug, const N: usize> fmt::Debug for ReasonList<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: Copy + fmt::Display, const N: usize> fmt::Display for ReasonList<T, N> {
    /// The items joined by `"; "`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{item}")?;
        }
        Ok(())
    }
}

impl<T: Copy, const N: usize> FromIterator<T> for ReasonList<T, N> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut list = Self::new();
        for item in iter {
            list.push(item);
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_n_items_in_order() {
        let mut l: ReasonList<u8, 2> = ReasonList::new();
        assert!(l.is_empty());
        assert!(l.push(7) && l.push(9));
        assert!(!l.push(11), "full");
        assert_eq!(l.len(), 2);
        assert_eq!(l.get(1), Some(&9));
        assert!(l.contains(&7) && !l.contains(&11));
        assert_eq!(alloc::format!("{l}"), "7; 9");
    }
}
