//! A table that can record which of its keys changed since it was last exported whole.
//!
//! A live upgrade between clients that can hand over changes exports the tables twice:
//! whole while serving (the base), and inside the freeze only what changed since
//! (`handover::export_delta`). Every change goes through [`Tracked::edit`], which names the
//! key it changes, so that nothing changes unseen while a base is out.

use std::collections::HashSet;
use std::hash::Hash;
use std::ops::Deref;

#[derive(Debug)]
pub struct Tracked<T, K> {
    table: T,
    /// Keys changed since the base; `None` while no base is out.
    changed: Option<HashSet<K>>,
}

impl<T, K: Hash + Eq> Tracked<T, K> {
    pub fn new(table: T) -> Self {
        Tracked {
            table,
            changed: None,
        }
    }

    /// The table, to change the entry of `key`.
    pub fn edit(&mut self, key: K) -> &mut T {
        if let Some(c) = &mut self.changed {
            c.insert(key);
        }
        &mut self.table
    }

    /// The table, to change many entries at once: only before this process serves
    /// (importing a predecessor's tables), when no base can be out.
    pub fn edit_untracked(&mut self) -> &mut T {
        debug_assert!(
            self.changed.is_none(),
            "an untracked change with a base out"
        );
        &mut self.table
    }

    /// A base of the table is exported now: record changes from here on (anew).
    pub fn start(&mut self) {
        self.changed = Some(HashSet::new());
    }

    /// The keys changed since the base, which is done with; `None` if no base was out.
    pub fn take(&mut self) -> Option<HashSet<K>> {
        self.changed.take()
    }

    /// The base is dropped: stop recording.
    pub fn stop(&mut self) {
        self.changed = None;
    }
}

impl<T, K> Deref for Tracked<T, K> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn records_only_while_a_base_is_out() {
        let mut t: Tracked<HashMap<u64, u64>, u64> = Tracked::new(HashMap::new());
        t.edit(1).insert(1, 1);
        assert_eq!(t.take(), None);
        t.start();
        t.edit(2).insert(2, 1);
        t.edit(1).remove(&1);
        let mut changed: Vec<u64> = t.take().unwrap().into_iter().collect();
        changed.sort_unstable();
        assert_eq!(changed, vec![1, 2]);
        assert_eq!(t.take(), None);
        t.start();
        t.stop();
        t.edit(3).insert(3, 1);
        assert_eq!(t.take(), None);
        assert_eq!(t.len(), 2);
    }
}
