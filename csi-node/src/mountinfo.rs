//! `/proc/self/mountinfo`: the host's word on what is mounted where. baton-csi counts the
//! users of a Baton mount from here (bind mounts share the FUSE connection's device
//! number), never from memory, so a restarted plugin sees exactly what its predecessor
//! left.

use std::path::{Path, PathBuf};

/// Baton's FUSE filesystem type, as the kernel reports it.
pub const BATON_FSTYPE: &str = "fuse.baton";

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    pub parent: u32,
    /// `major:minor` of the filesystem; shared by every bind mount of it.
    pub dev: (u32, u32),
    /// The directory of the filesystem that is mounted here (`/` or a bind's subdirectory).
    pub root: PathBuf,
    pub mountpoint: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, ...).
    pub options: String,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    pub fn is_readonly(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }

    pub fn is_baton(&self) -> bool {
        self.fstype == BATON_FSTYPE
    }
}

/// A snapshot of the mount table.
#[derive(Clone, Debug, Default)]
pub struct MountTable(pub Vec<MountEntry>);

impl MountTable {
    /// Reads `/proc/self/mountinfo`.
    pub fn read() -> std::io::Result<MountTable> {
        Ok(MountTable::parse(&std::fs::read_to_string(
            "/proc/self/mountinfo",
        )?))
    }

    /// Parses mountinfo text; malformed lines are skipped.
    pub fn parse(text: &str) -> MountTable {
        MountTable(text.lines().filter_map(parse_line).collect())
    }

    /// The topmost mount at `path` (the last one mounted there), if any.
    pub fn at(&self, path: &Path) -> Option<&MountEntry> {
        self.0.iter().rev().find(|e| e.mountpoint == path)
    }

    /// Every mount of the filesystem `dev` except those at `except` or below `exclude_under`.
    pub fn users_of<'a>(
        &'a self,
        dev: (u32, u32),
        except: &'a Path,
        exclude_under: &'a Path,
    ) -> impl Iterator<Item = &'a MountEntry> + 'a {
        self.0.iter().filter(move |e| {
            e.dev == dev && e.mountpoint != except && !e.mountpoint.starts_with(exclude_under)
        })
    }
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0');
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let mut parts = line.split(' ');
    let id = parts.next()?.parse().ok()?;
    let parent = parts.next()?.parse().ok()?;
    let (maj, min) = parts.next()?.split_once(':')?;
    let dev = (maj.parse().ok()?, min.parse().ok()?);
    let root = PathBuf::from(unescape(parts.next()?));
    let mountpoint = PathBuf::from(unescape(parts.next()?));
    let options = parts.next()?.to_string();
    // Optional fields, up to the "-" separator.
    for p in parts.by_ref() {
        if p == "-" {
            break;
        }
    }
    let fstype = parts.next()?.to_string();
    let source = unescape(parts.next().unwrap_or(""));
    Some(MountEntry {
        id,
        parent,
        dev,
        root,
        mountpoint,
        options,
        fstype,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:52 / /var/lib/baton-csi/mnt/abc rw,nosuid,nodev,relatime shared:30 - fuse.baton baton rw,user_id=0,group_id=0,default_permissions,allow_other
41 22 0:52 /volumes/pvc-1 /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pv1/mount rw,nosuid,nodev,relatime shared:30 - fuse.baton baton rw
42 22 0:52 /volumes/pvc-1 /var/lib/kubelet/pods/u2/volumes/kubernetes.io~csi/pv\\0401/mount ro,nosuid,nodev,relatime shared:30 - fuse.baton baton rw
43 22 0:53 / /tmp/other rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_fields_and_escapes() {
        let t = MountTable::parse(SAMPLE);
        assert_eq!(t.0.len(), 5);
        let e = &t.0[3];
        assert_eq!(e.dev, (0, 52));
        assert_eq!(e.root, PathBuf::from("/volumes/pvc-1"));
        assert_eq!(
            e.mountpoint,
            PathBuf::from("/var/lib/kubelet/pods/u2/volumes/kubernetes.io~csi/pv 1/mount")
        );
        assert!(e.is_readonly() && e.is_baton());
        assert!(!t.0[2].is_readonly());
        assert_eq!(t.0[4].fstype, "tmpfs");
    }

    #[test]
    fn counts_users_of_a_backend() {
        let t = MountTable::parse(SAMPLE);
        let mp = Path::new("/var/lib/baton-csi/mnt/abc");
        let b = t.at(mp).expect("backend mounted");
        let users: Vec<_> = t
            .users_of(b.dev, mp, Path::new("/var/lib/baton-csi/mnt"))
            .collect();
        assert_eq!(users.len(), 2);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let t = MountTable::parse("garbage\n1 2 x / / rw - ext4 a rw\n");
        assert!(t.0.is_empty());
    }
}
