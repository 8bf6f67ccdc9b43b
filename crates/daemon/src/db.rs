//! The inventory's durable state: a SQLite database in WAL mode, migrated through a schema
//! version table.
//!
//! Names are unique by table constraint, so two concurrent creates of the same name cannot
//! both succeed. Times are Unix milliseconds.

use std::path::Path;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, Transaction};

use crate::model::{DiskAttachment, DiskState, EngineChoice, EngineKind, VmSettings, VmState};

mod networks;
pub use networks::{NetworkRecord, NicRecord};

/// Schema migrations, applied in order; the schema version is the number applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE vms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    cpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    kernel TEXT,
    initrd TEXT,
    cmdline TEXT,
    append TEXT NOT NULL,
    engine TEXT NOT NULL,
    rng INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    pid INTEGER,
    pid_start_ticks INTEGER,
    started_at INTEGER,
    run_engine TEXT,
    boot_time_ms INTEGER,
    exit_at INTEGER,
    exit_status INTEGER,
    exit_reason TEXT,
    exit_console_tail TEXT
);
CREATE TABLE disks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE vm_disks (
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    disk_id INTEGER NOT NULL REFERENCES disks(id) ON DELETE RESTRICT,
    read_only INTEGER NOT NULL,
    PRIMARY KEY (vm_id, position),
    UNIQUE (vm_id, disk_id)
);
"#,
    // 2: VMs created from a distribution image.
    "ALTER TABLE vms ADD COLUMN image TEXT;",
    // 3: networks, NICs with their reserved addresses, port forwards.
    r#"
CREATE TABLE networks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    subnet TEXT NOT NULL,
    mode TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE vm_nics (
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    network_id INTEGER NOT NULL REFERENCES networks(id) ON DELETE RESTRICT,
    mac TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    PRIMARY KEY (vm_id, position),
    UNIQUE (network_id, address)
);
CREATE TABLE port_forwards (
    host_port INTEGER PRIMARY KEY,
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    guest_port INTEGER NOT NULL
);
"#,
];

/// Errors from the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("Cannot open database {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("Database schema version {found} is newer than this lodge understands ({known})")]
    TooNew { found: i64, known: i64 },
    #[error("Name '{0}' is taken")]
    NameTaken(String),
    #[error("Disk '{0}' does not exist")]
    DiskNotFound(String),
    #[error("Disk '{0}' is attached twice")]
    DuplicateDisk(String),
    #[error("Network '{0}' does not exist")]
    NetworkNotFound(String),
    #[error("Network '{0}' has no free address left")]
    PoolExhausted(String),
    #[error("MAC address {0} is taken")]
    MacTaken(String),
    #[error("Host port {0} is already forwarded")]
    PortTaken(u16),
    #[error("Database query failed")]
    Sqlite(#[from] rusqlite::Error),
    #[error("Corrupt value in column {0}")]
    Corrupt(&'static str),
}

/// A VM row with its disks.
#[derive(Debug, Clone)]
pub struct VmRecord {
    pub id: i64,
    pub name: String,
    pub settings: VmSettings,
    /// Host paths of the attached disks, in `settings.disks` order.
    pub disk_paths: Vec<String>,
    pub state: VmState,
    pub created_at: i64,
    pub updated_at: i64,
    pub runtime: Option<RuntimeRecord>,
    pub last_exit: Option<ExitRecord>,
}

/// The VMM process of an active VM.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeRecord {
    /// Absent between the state change to `starting` and the spawn.
    pub pid: Option<u32>,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat` field 22), so
    /// a reused pid is never mistaken for the VMM.
    pub start_ticks: Option<u64>,
    pub started_at: i64,
    pub engine: Option<EngineKind>,
    pub boot_time_ms: Option<u64>,
}

/// How a VMM process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitRecord {
    pub at: i64,
    pub status: Option<i32>,
    pub reason: String,
    pub console_tail: Option<String>,
}

/// A disk row with the names of the VMs it is attached to.
#[derive(Debug, Clone)]
pub struct DiskRecord {
    pub id: i64,
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
    pub state: DiskState,
    pub error: Option<String>,
    pub created_at: i64,
    pub attached_to: Vec<String>,
}

/// The open database.
pub struct Db {
    conn: Connection,
}

const VM_COLUMNS: &str = "id, name, cpus, memory_mib, kernel, initrd, cmdline, append, engine, \
    rng, state, created_at, updated_at, pid, pid_start_ticks, started_at, run_engine, \
    boot_time_ms, exit_at, exit_status, exit_reason, exit_console_tail, image";

impl Db {
    /// Opens (creating if needed) and migrates the database.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let open_error = |source| DbError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_error)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_error)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_error)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_error)?;
        let mut db = Self { conn };
        db.migrate()?;
        Ok(db)
    }

    /// The number of migrations applied.
    pub fn schema_version(&self) -> Result<i64, DbError> {
        Ok(self
            .conn
            .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
            .optional()?
            .unwrap_or(0))
    }

    fn migrate(&mut self) -> Result<(), DbError> {
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
        )?;
        let known = MIGRATIONS.len() as i64;
        let found = self.schema_version()?;
        if found > known {
            return Err(DbError::TooNew { found, known });
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(migration)?;
            tx.execute("DELETE FROM schema_version", [])?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [index as i64 + 1],
            )?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Defines a VM in state `stopped`, with NICs on the networks `nics` name (each gets the
    /// MAC asked for or a random one, and the network's first free address).
    pub fn insert_vm(
        &mut self,
        name: &str,
        settings: &VmSettings,
        nics: &[crate::model::NicRequest],
    ) -> Result<VmRecord, DbError> {
        let now = now_ms();
        let tx = self.conn.transaction()?;
        let inserted = tx.execute(
            "INSERT INTO vms (name, cpus, memory_mib, kernel, initrd, cmdline, append, engine, \
             rng, image, state, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
            rusqlite::params_from_iter(settings_row(
                name.to_owned().into(),
                settings,
                [VmState::Stopped.as_str().to_owned().into(), now.into()],
            )),
        );
        match inserted {
            Err(e) if is_unique_violation(&e) => return Err(DbError::NameTaken(name.to_owned())),
            other => other?,
        };
        let id = tx.last_insert_rowid();
        attach_disks(&tx, id, &settings.disks)?;
        networks::attach_nics(&tx, id, nics)?;
        tx.commit()?;
        self.vm_by_id(id)?.ok_or(DbError::Corrupt("id"))
    }

    /// Replaces a VM's settings.
    /// Replaces a VM's settings, and its NICs when `nics` is given (see
    /// [`networks::replace_nics`]).
    pub fn update_vm_settings(
        &mut self,
        id: i64,
        settings: &VmSettings,
        nics: Option<&[crate::model::NicRequest]>,
    ) -> Result<(), DbError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE vms SET cpus = ?2, memory_mib = ?3, kernel = ?4, initrd = ?5, cmdline = ?6, \
             append = ?7, engine = ?8, rng = ?9, image = ?10, updated_at = ?11 WHERE id = ?1",
            rusqlite::params_from_iter(settings_row(id.into(), settings, [now_ms().into()])),
        )?;
        tx.execute("DELETE FROM vm_disks WHERE vm_id = ?1", [id])?;
        attach_disks(&tx, id, &settings.disks)?;
        if let Some(nics) = nics {
            networks::replace_nics(&tx, id, nics)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn vm(&self, name: &str) -> Result<Option<VmRecord>, DbError> {
        self.query_vms(
            &format!("SELECT {VM_COLUMNS} FROM vms WHERE name = ?1"),
            [name],
        )
        .map(|mut vms| vms.pop())
    }

    pub fn vm_by_id(&self, id: i64) -> Result<Option<VmRecord>, DbError> {
        self.query_vms(&format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"), [id])
            .map(|mut vms| vms.pop())
    }

    /// All VMs, by name.
    pub fn vms(&self) -> Result<Vec<VmRecord>, DbError> {
        self.query_vms(&format!("SELECT {VM_COLUMNS} FROM vms ORDER BY name"), [])
    }

    pub fn delete_vm(&mut self, id: i64) -> Result<(), DbError> {
        self.conn.execute("DELETE FROM vms WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Moves a VM to `to` if it is in one of `from`; false if it was not.
    pub fn transition(&self, id: i64, from: &[VmState], to: VmState) -> Result<bool, DbError> {
        let from: Vec<&str> = from.iter().map(|state| state.as_str()).collect();
        let placeholders = vec!["?"; from.len()].join(", ");
        let sql = format!(
            "UPDATE vms SET state = ?, updated_at = ? WHERE id = ? AND state IN ({placeholders})"
        );
        let mut values: Vec<rusqlite::types::Value> =
            vec![to.as_str().to_owned().into(), now_ms().into(), id.into()];
        values.extend(from.into_iter().map(|s| s.to_owned().into()));
        let changed = self
            .conn
            .execute(&sql, rusqlite::params_from_iter(values))?;
        Ok(changed == 1)
    }

    /// Records a new VMM process (or its absence, before the spawn) for a `starting` VM.
    pub fn set_runtime(&self, id: i64, runtime: &RuntimeRecord) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE vms SET pid = ?2, pid_start_ticks = ?3, started_at = ?4, run_engine = ?5, \
             boot_time_ms = ?6 WHERE id = ?1",
            params![
                id,
                runtime.pid,
                runtime.start_ticks.map(|t| t as i64),
                runtime.started_at,
                runtime.engine.map(EngineKind::as_str),
                runtime.boot_time_ms.map(|t| t as i64),
            ],
        )?;
        Ok(())
    }

    /// Records what a running VMM reported about itself.
    pub fn set_runtime_info(
        &self,
        id: i64,
        engine: Option<EngineKind>,
        boot_time_ms: Option<u64>,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE vms SET run_engine = coalesce(?2, run_engine), \
             boot_time_ms = coalesce(?3, boot_time_ms) WHERE id = ?1 AND started_at IS NOT NULL",
            params![
                id,
                engine.map(EngineKind::as_str),
                boot_time_ms.map(|t| t as i64)
            ],
        )?;
        Ok(())
    }

    /// Records how the VMM ended and clears its runtime fields.
    pub fn set_exited(&self, id: i64, state: VmState, exit: &ExitRecord) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE vms SET state = ?2, updated_at = ?3, pid = NULL, pid_start_ticks = NULL, \
             started_at = NULL, run_engine = NULL, boot_time_ms = NULL, exit_at = ?4, \
             exit_status = ?5, exit_reason = ?6, exit_console_tail = ?7 WHERE id = ?1",
            params![
                id,
                state.as_str(),
                now_ms(),
                exit.at,
                exit.status,
                exit.reason,
                exit.console_tail,
            ],
        )?;
        Ok(())
    }

    /// Adds a disk row.
    pub fn insert_disk(
        &self,
        name: &str,
        path: &str,
        size_bytes: u64,
        state: DiskState,
    ) -> Result<DiskRecord, DbError> {
        let inserted = self.conn.execute(
            "INSERT INTO disks (name, path, size_bytes, state, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, path, size_bytes as i64, state.as_str(), now_ms()],
        );
        match inserted {
            Err(e) if is_unique_violation(&e) => Err(DbError::NameTaken(name.to_owned())),
            other => {
                other?;
                self.disk(name)?.ok_or(DbError::Corrupt("id"))
            }
        }
    }

    pub fn disk(&self, name: &str) -> Result<Option<DiskRecord>, DbError> {
        self.query_disks("WHERE d.name = ?1", [name])
            .map(|mut disks| disks.pop())
    }

    /// All disks, by name.
    pub fn disks(&self) -> Result<Vec<DiskRecord>, DbError> {
        self.query_disks("", [])
    }

    pub fn set_disk_state(
        &self,
        id: i64,
        state: DiskState,
        size_bytes: u64,
        error: Option<&str>,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE disks SET state = ?2, size_bytes = ?3, error = ?4 WHERE id = ?1",
            params![id, state.as_str(), size_bytes as i64, error],
        )?;
        Ok(())
    }

    /// Deletes a disk row; the caller has checked it is not attached (the foreign key
    /// refuses it otherwise).
    pub fn delete_disk(&self, id: i64) -> Result<(), DbError> {
        self.conn.execute("DELETE FROM disks WHERE id = ?1", [id])?;
        Ok(())
    }

    fn query_vms<P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
    ) -> Result<Vec<VmRecord>, DbError> {
        let mut statement = self.conn.prepare_cached(sql)?;
        let mut vms = statement
            .query_map(params, vm_from_row)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let mut attachments = self.conn.prepare_cached(
            "SELECT d.name, d.path, a.read_only FROM vm_disks a JOIN disks d ON d.id = a.disk_id \
             WHERE a.vm_id = ?1 ORDER BY a.position",
        )?;
        for vm in &mut vms {
            let rows = attachments.query_map([vm.id], |row| {
                Ok((
                    DiskAttachment {
                        disk: row.get(0)?,
                        read_only: row.get(2)?,
                    },
                    row.get::<_, String>(1)?,
                ))
            })?;
            for row in rows {
                let (attachment, path) = row?;
                vm.settings.disks.push(attachment);
                vm.disk_paths.push(path);
            }
            vm.settings.nics = self.nics_of(vm.id)?;
            vm.settings.port_forwards = self.port_forwards_of(vm.id)?;
        }
        Ok(vms)
    }

    fn query_disks<P: rusqlite::Params>(
        &self,
        filter: &str,
        params: P,
    ) -> Result<Vec<DiskRecord>, DbError> {
        let sql = format!(
            "SELECT d.id, d.name, d.path, d.size_bytes, d.state, d.error, d.created_at, \
             (SELECT group_concat(name, char(10)) FROM (SELECT v.name AS name FROM vm_disks a \
              JOIN vms v ON v.id = a.vm_id WHERE a.disk_id = d.id ORDER BY v.name)) \
             FROM disks d {filter} ORDER BY d.name"
        );
        let mut statement = self.conn.prepare_cached(&sql)?;
        let rows = statement.query_map(params, |row| {
            let state: String = row.get(4)?;
            let attached: Option<String> = row.get(7)?;
            Ok((
                DiskRecord {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    path: row.get(2)?,
                    size_bytes: row.get::<_, i64>(3)? as u64,
                    state: DiskState::Ready,
                    error: row.get(5)?,
                    created_at: row.get(6)?,
                    attached_to: attached
                        .map(|names| names.split('\n').map(str::to_owned).collect())
                        .unwrap_or_default(),
                },
                state,
            ))
        })?;
        let mut disks = Vec::new();
        for row in rows {
            let (mut disk, state) = row?;
            disk.state = DiskState::parse(&state).ok_or(DbError::Corrupt("disks.state"))?;
            disks.push(disk);
        }
        Ok(disks)
    }
}

fn attach_disks(tx: &Transaction<'_>, vm_id: i64, disks: &[DiskAttachment]) -> Result<(), DbError> {
    for (position, attachment) in disks.iter().enumerate() {
        let disk_id: Option<i64> = tx
            .query_row(
                "SELECT id FROM disks WHERE name = ?1",
                [&attachment.disk],
                |row| row.get(0),
            )
            .optional()?;
        let disk_id = disk_id.ok_or_else(|| DbError::DiskNotFound(attachment.disk.clone()))?;
        let inserted = tx.execute(
            "INSERT INTO vm_disks (vm_id, position, disk_id, read_only) VALUES (?1, ?2, ?3, ?4)",
            params![vm_id, position as i64, disk_id, attachment.read_only],
        );
        match inserted {
            Err(e) if is_unique_violation(&e) => {
                return Err(DbError::DuplicateDisk(attachment.disk.clone()))
            }
            other => other?,
        };
    }
    Ok(())
}

type RowResult = Result<VmRecord, DbError>;

fn vm_from_row(row: &Row<'_>) -> rusqlite::Result<RowResult> {
    let append: String = row.get(7)?;
    let engine: String = row.get(8)?;
    let state: String = row.get(10)?;
    let pid: Option<u32> = row.get(13)?;
    let started_at: Option<i64> = row.get(15)?;
    let exit_reason: Option<String> = row.get(20)?;
    let (Some(engine), Some(state), Ok(append)) = (
        engine.parse::<EngineChoice>().ok(),
        VmState::parse(&state),
        serde_json::from_str::<Vec<String>>(&append),
    ) else {
        return Ok(Err(DbError::Corrupt("vms")));
    };
    let runtime = started_at.map(|started_at| -> rusqlite::Result<RuntimeRecord> {
        Ok(RuntimeRecord {
            pid,
            start_ticks: row.get::<_, Option<i64>>(14)?.map(|t| t as u64),
            started_at,
            engine: row
                .get::<_, Option<String>>(16)?
                .and_then(|engine| engine.parse().ok()),
            boot_time_ms: row.get::<_, Option<i64>>(17)?.map(|t| t as u64),
        })
    });
    let last_exit = exit_reason.map(|reason| -> rusqlite::Result<ExitRecord> {
        Ok(ExitRecord {
            at: row.get(18)?,
            status: row.get(19)?,
            reason,
            console_tail: row.get(21)?,
        })
    });
    Ok(Ok(VmRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        settings: VmSettings {
            cpus: row.get(2)?,
            memory_mib: row.get::<_, i64>(3)? as u64,
            disks: Vec::new(),
            kernel: row.get(4)?,
            initrd: row.get(5)?,
            cmdline: row.get(6)?,
            append,
            engine,
            rng: row.get(9)?,
            image: row.get(22)?,
            nics: Vec::new(),
            port_forwards: Vec::new(),
        },
        disk_paths: Vec::new(),
        state,
        created_at: row.get(11)?,
        updated_at: row.get(12)?,
        runtime: runtime.transpose()?,
        last_exit: last_exit.transpose()?,
    }))
}

/// Statement parameters: `first` (?1), the settings columns in the order both the insert and
/// the update bind them (?2 to ?10), then `rest`.
fn settings_row(
    first: Value,
    settings: &VmSettings,
    rest: impl IntoIterator<Item = Value>,
) -> Vec<Value> {
    let mut row = vec![
        first,
        settings.cpus.into(),
        (settings.memory_mib as i64).into(),
        settings.kernel.clone().into(),
        settings.initrd.clone().into(),
        settings.cmdline.clone().into(),
        append_json(&settings.append).into(),
        settings.engine.as_str().to_owned().into(),
        settings.rng.into(),
        settings.image.clone().into(),
    ];
    row.extend(rest);
    row
}

fn append_json(append: &[String]) -> String {
    serde_json::to_string(append).unwrap_or_else(|_| "[]".to_owned())
}

fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(e, _)
            if e.code == ErrorCode::ConstraintViolation
                && (e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    )
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Unix milliseconds as RFC 3339.
pub fn rfc3339(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> VmSettings {
        VmSettings {
            cpus: 2,
            memory_mib: 512,
            disks: Vec::new(),
            kernel: None,
            initrd: None,
            cmdline: Some("console=ttyS0".into()),
            append: vec!["quiet".into()],
            engine: EngineChoice::Emulator,
            rng: true,
            image: Some("debian".into()),
            nics: Vec::new(),
            port_forwards: Vec::new(),
        }
    }

    #[test]
    fn vms_round_trip_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("t.db")).unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as i64);
        db.insert_disk("d1", "/x/d1.raw", 1 << 20, DiskState::Ready)
            .unwrap();
        let mut with_disk = settings();
        with_disk.disks.push(DiskAttachment {
            disk: "d1".into(),
            read_only: true,
        });
        let vm = db.insert_vm("a", &with_disk, &[]).unwrap();
        assert_eq!(vm.settings, with_disk);
        assert_eq!(vm.disk_paths, vec!["/x/d1.raw".to_owned()]);
        assert_eq!(vm.state, VmState::Stopped);
        assert!(matches!(
            db.insert_vm("a", &settings(), &[]),
            Err(DbError::NameTaken(_))
        ));
        assert_eq!(
            db.disk("d1").unwrap().unwrap().attached_to,
            vec!["a".to_owned()]
        );

        let mut missing = settings();
        missing.disks.push(DiskAttachment {
            disk: "nope".into(),
            read_only: false,
        });
        assert!(matches!(
            db.insert_vm("b", &missing, &[]),
            Err(DbError::DiskNotFound(_))
        ));
        assert!(db.vm("b").unwrap().is_none(), "a failed insert left a row");
    }

    #[test]
    fn transitions_are_compare_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("t.db")).unwrap();
        let vm = db.insert_vm("a", &settings(), &[]).unwrap();
        assert!(db
            .transition(vm.id, &[VmState::Stopped], VmState::Starting)
            .unwrap());
        assert!(!db
            .transition(vm.id, &[VmState::Stopped], VmState::Starting)
            .unwrap());
        let runtime = RuntimeRecord {
            pid: Some(42),
            start_ticks: Some(7),
            started_at: 1000,
            engine: None,
            boot_time_ms: None,
        };
        db.set_runtime(vm.id, &runtime).unwrap();
        assert_eq!(db.vm("a").unwrap().unwrap().runtime, Some(runtime));
        let exit = ExitRecord {
            at: 2000,
            status: Some(1),
            reason: "Triple fault".into(),
            console_tail: Some("panic".into()),
        };
        db.set_exited(vm.id, VmState::Crashed, &exit).unwrap();
        let vm = db.vm("a").unwrap().unwrap();
        assert_eq!(
            (vm.state, vm.runtime, vm.last_exit),
            (VmState::Crashed, None, Some(exit))
        );
    }

    #[test]
    fn reopening_keeps_data_and_refuses_newer_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        Db::open(&path)
            .unwrap()
            .insert_vm("a", &settings(), &[])
            .unwrap();
        let db = Db::open(&path).unwrap();
        assert_eq!(db.vms().unwrap().len(), 1);
        db.conn
            .execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(db);
        assert!(matches!(
            Db::open(&path),
            Err(DbError::TooNew { found: 99, .. })
        ));
    }
}
