// Package capture records which rows change in the source database while the
// data is copied, with plain triggers (no superuser, no wal_level change), so
// that the incremental sync can bring those rows over.
//
// What is installed, all in the library's schema unless noted:
//
//   - changes: an UNLOGGED table of (id, tbl, k): the source table's oid and
//     the text form of the changed row's primary key. An UPDATE that changes
//     the key records both keys. Rows are written by the triggers and
//     consumed (deleted) by the sync.
//   - capture_alive: an UNLOGGED table holding one row. Crash recovery
//     empties unlogged tables; a missing row means changes were lost and the
//     run must start again.
//   - capture_<oid>(): one trigger function per table, with static SQL, and
//     on each table (in its own schema) the row trigger "<ns>_capture" AFTER
//     INSERT OR UPDATE OR DELETE, and "<ns>_capture_truncate" BEFORE TRUNCATE,
//     which refuses TRUNCATE while a switchover is in progress.
//
// The triggers are ENABLE ALWAYS: sessions with session_replication_role =
// replica (logical replication apply, some bulk tools) skip ordinary
// triggers, and their writes must be captured (and, after the switch,
// refused) too.
//
// Row triggers, not statement triggers with transition tables: a statement on
// an inheritance parent or a partitioned table fires statement triggers on the
// named table only, while row triggers fire on the table that holds the row.
//
// Why no write escapes capture. CREATE TRIGGER takes a SHARE ROW EXCLUSIVE
// lock on the table, which waits for every transaction that has written to it
// (those hold ROW EXCLUSIVE until they end). Each table's trigger is installed
// in a transaction of its own, so no lock cycle can form with the
// application's transactions. Once Install returns, every write to a synced
// table either committed before its table's trigger did, and is therefore
// visible to any snapshot taken afterwards (the initial copy's), or runs with
// the trigger and is recorded. Waiting for the application's transactions is
// bounded: the lock is requested with a short lock_timeout (so the
// application's queries never queue behind it for long) and retried until
// Options.Timeout, after which Install fails naming the sessions in the way.
//
// Key text is produced by each type's output function, in the writer's
// session. For keys whose text depends on session settings (decided by type:
// see schema.Column.TextStable) the trigger function pins those settings
// (KeySettings), so that the key reads back the same in the sync's session
// whatever the writer's DateStyle, TimeZone or extra_float_digits.
//
// The trigger function runs with its owner's rights (see tableDDL), so a
// writer that has no rights on the library's schema is captured too.
package capture

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgswo/swo/internal/schema"
)

// Capture installs and removes change capture in one database.
type Capture struct {
	Schema string // the library's schema (also the prefix of trigger names)
}

// Options tune installation and removal.
type Options struct {
	// LockTimeout bounds each attempt to lock a table for trigger DDL, and so
	// how long the application's queries on that table may queue behind it.
	LockTimeout time.Duration
	// Timeout bounds the whole wait for transactions in the way.
	Timeout time.Duration
	// MaxLockTimeout: each attempt that times out doubles the next one's
	// lock timeout, up to MaxLockTimeout, so that a table whose writers'
	// transactions always overlap (none is long, but at every moment one
	// is open) is locked in the end; its writers then queue behind the DDL
	// for up to that long. Default: LockTimeout (no escalation).
	MaxLockTimeout time.Duration
}

func (o Options) withDefaults() Options {
	if o.LockTimeout <= 0 {
		o.LockTimeout = 200 * time.Millisecond
	}
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	o.MaxLockTimeout = max(o.MaxLockTimeout, o.LockTimeout)
	return o
}

// ErrBlocked is wrapped when sessions kept capture from being installed or removed in time.
var ErrBlocked = errors.New("blocked by other sessions")

// ErrLost is returned by Alive when captured changes were lost (crash recovery).
var ErrLost = errors.New("captured changes were lost (the old database restarted after a crash): RESET and EXECUTE again")

func (c Capture) q(name string) string { return pgx.Identifier{c.Schema, name}.Sanitize() }

// ChangesTable is the qualified name of the change table.
func (c Capture) ChangesTable() string { return c.q("changes") }

func (c Capture) triggerName() string  { return c.Schema + "_capture" }
func (c Capture) truncateName() string { return c.Schema + "_capture_truncate" }

// Install creates the change table and the triggers on every table, and
// the seal trigger on every top-level partitioned table of parents (see
// sealDDL).
func (c Capture) Install(ctx context.Context, conn *pgx.Conn, tables, parents []*schema.Table, opts Options) error {
	opts = opts.withDefaults()
	_, err := conn.Exec(ctx, fmt.Sprintf(`
CREATE UNLOGGED TABLE IF NOT EXISTS %[1]s (
	id  bigint GENERATED ALWAYS AS IDENTITY,
	tbl oid NOT NULL,
	k   text[] NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_id ON %[1]s (id);
CREATE UNLOGGED TABLE IF NOT EXISTS %[2]s (alive boolean PRIMARY KEY);
INSERT INTO %[2]s VALUES (true) ON CONFLICT DO NOTHING;
CREATE OR REPLACE FUNCTION %[3]s() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
	RAISE EXCEPTION 'swo: TRUNCATE of %%.%% refused: a database switchover is in progress (use DELETE, or RESET the switchover first)', TG_TABLE_SCHEMA, TG_TABLE_NAME
		USING ERRCODE = 'object_not_in_prerequisite_state';
END $f$;`, c.q("changes"), c.q("capture_alive"), c.q("capture_truncate")))
	if err != nil {
		return fmt.Errorf("create change table: %w", err)
	}
	deadline := time.Now().Add(opts.Timeout)
	for _, t := range tables {
		ddl := c.tableDDL(t)
		if err := withLockRetry(ctx, conn, t, opts, deadline, ddl); err != nil {
			return fmt.Errorf("install change capture on %s: %w", t, err)
		}
	}
	var version int
	if err := conn.QueryRow(ctx, "SELECT pg_catalog.current_setting('server_version_num')::int").Scan(&version); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, c.sealFunction()); err != nil {
		return fmt.Errorf("create the partitions' seal: %w", err)
	}
	sealed := map[string]bool{}
	for _, t := range parents {
		sealed[t.String()] = true
	}
	for _, t := range parents {
		if slices.ContainsFunc(t.Parents, func(p string) bool { return sealed[p] }) {
			continue // its parent's trigger is cloned to it
		}
		if err := withLockRetry(ctx, conn, t, opts, deadline, c.sealDDL(t, version)); err != nil {
			return fmt.Errorf("install change capture on %s: %w", t, err)
		}
	}
	return nil
}

// sealName is the seal trigger's name.
func (c Capture) sealName() string { return c.Schema + "_obsolete" }

// sealFunction lets every row through: the seal's function until the switch,
// when RejectWritesSQL replaces it, in the switch's transaction, with one
// that refuses the write.
func (c Capture) sealFunction() string {
	return fmt.Sprintf(`CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
	IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
		RETURN OLD;
	END IF;
	RETURN NEW;
END $f$`, c.q("seal"))
}

// sealDDL puts the seal trigger on a partitioned table. A row trigger on a
// partitioned table is cloned to each of its partitions, those created or
// attached later too: after the switch, a partition maintenance job still
// pointed at the old database, which creates next month's partition and
// writes through the parent, is refused like every other writer (the new
// partition carries no capture trigger of its own). Installed with capture,
// so that the switch itself (one CREATE OR REPLACE FUNCTION, no lock on the
// tables) turns it on: there is no moment after the commit when such a write
// is accepted, and nothing is left to do if the leader dies right after it.
//
// It fires BEFORE the row is written, so that COPY and INSERT lose no more
// than they must; before PostgreSQL 13 a partitioned table takes only AFTER
// row triggers, which refuse the write as well (the statement fails).
func (c Capture) sealDDL(t *schema.Table, serverVersion int) string {
	when := "BEFORE"
	if serverVersion < 130000 {
		when = "AFTER"
	}
	name := pgx.Identifier{c.sealName()}.Sanitize()
	return fmt.Sprintf("DROP TRIGGER IF EXISTS %[1]s ON %[2]s; CREATE TRIGGER %[1]s %[4]s INSERT OR UPDATE OR DELETE ON %[2]s FOR EACH ROW EXECUTE FUNCTION %[3]s(); ALTER TABLE %[2]s ENABLE ALWAYS TRIGGER %[1]s",
		name, t.QName(), c.q("seal"), when)
}

// tableDDL is the trigger function and triggers for one table.
//
// The function is SECURITY DEFINER, owned by the role that installs
// capture, so that every writer is captured whatever its own rights: a role
// with rights on the table but none on the library's schema (a cron job, an
// ETL role) would otherwise fail every write for the whole run. Every name
// in its body is schema-qualified, operators included (OPERATOR(pg_catalog.=)),
// so that none can be resolved to an object a writer placed on its own
// search_path; it does not pin search_path with a SET clause, which would
// cost a settings save and restore on every captured row. EXECUTE is
// revoked from PUBLIC. Keys are rendered with their types' output functions
// (never a cast of the user's).
// Whether the key changed is decided on the keys' text forms, which needs
// only pg_catalog's text comparison (two texts for equal keys, as 1.0 and
// 1.00, record both: harmless).
func (c Capture) tableDDL(t *schema.Table) string {
	// format's %s renders a value with its type's output function, as COPY
	// does; a cast to text would use a cast of the user's if the type has
	// one (and run it with the function owner's rights).
	key := func(rec string) string {
		parts := make([]string, len(t.PrimaryKey))
		for i, col := range t.PrimaryKey {
			parts[i] = "pg_catalog.format('%s', " + rec + "." + pgx.Identifier{col}.Sanitize() + ")"
		}
		return "ARRAY[" + strings.Join(parts, ", ") + "]"
	}
	ins := func(k string) string {
		return fmt.Sprintf("INSERT INTO %s (tbl, k) VALUES (%d, %s);", c.q("changes"), t.OID, k)
	}
	fn := c.q(fmt.Sprintf("capture_%d", t.OID))
	return fmt.Sprintf(`
CREATE OR REPLACE FUNCTION %[1]s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER%[2]s AS $f$
DECLARE
	k pg_catalog.text[];
	old_k pg_catalog.text[];
BEGIN
	IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
		%[3]s
		RETURN NULL;
	END IF;
	k := %[4]s;
	%[5]s
	IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
		old_k := %[6]s;
		IF old_k OPERATOR(pg_catalog.<>) k THEN
			%[7]s
		END IF;
	END IF;
	RETURN NULL;
END $f$;
REVOKE EXECUTE ON FUNCTION %[1]s() FROM PUBLIC;
DROP TRIGGER IF EXISTS %[8]s ON %[10]s;
CREATE TRIGGER %[8]s AFTER INSERT OR UPDATE OR DELETE ON %[10]s FOR EACH ROW EXECUTE FUNCTION %[1]s();
ALTER TABLE %[10]s ENABLE ALWAYS TRIGGER %[8]s;
DROP TRIGGER IF EXISTS %[9]s ON %[10]s;
CREATE TRIGGER %[9]s BEFORE TRUNCATE ON %[10]s FOR EACH STATEMENT EXECUTE FUNCTION %[11]s();
ALTER TABLE %[10]s ENABLE ALWAYS TRIGGER %[9]s;`,
		fn, pinSettings(t), ins(key("OLD")), key("NEW"), ins("k"), key("OLD"), ins("old_k"),
		pgx.Identifier{c.triggerName()}.Sanitize(), pgx.Identifier{c.truncateName()}.Sanitize(), t.QName(), c.q("capture_truncate"))
}

// KeySettings are the settings a key's text form may depend on, pinned in
// the trigger function of a table whose key needs them and in the sync's
// sessions (which parse the keys back) to the same values.
var KeySettings = [][2]string{
	{"DateStyle", "ISO, MDY"},
	{"IntervalStyle", "postgres"},
	{"extra_float_digits", "3"},
	{"bytea_output", "hex"},
	{"TimeZone", "UTC"},
	{"lc_monetary", "C"},
}

// pinSettings returns SET clauses for a trigger function whose key text
// would otherwise depend on the writing session's settings. The decision
// is by type, through domains, arrays, ranges and composites
// (schema.Column.TextStable), not by the type's name.
func pinSettings(t *schema.Table) string {
	if t.KeyTextStable() {
		return ""
	}
	var b strings.Builder
	for _, kv := range KeySettings {
		fmt.Fprintf(&b, " SET %s = '%s'", kv[0], kv[1])
	}
	// reg* values render relative to search_path: qualified under
	// pg_catalog alone, they parse the same under any path.
	b.WriteString(" SET search_path = pg_catalog")
	return b.String()
}

// Remove drops every trigger and function the library installed in this
// database and the change table. It is idempotent and removes capture even
// from tables that are no longer synced.
func (c Capture) Remove(ctx context.Context, conn *pgx.Conn, opts Options) error {
	opts = opts.withDefaults()
	rows, err := conn.Query(ctx, `
SELECT tg.tgrelid, n.nspname, cl.relname, tg.tgname
FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
JOIN pg_class cl ON cl.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = cl.relnamespace
WHERE pn.nspname = $1 AND (tg.tgname IN ($2, $3) OR tg.tgname = $4 AND NOT EXISTS (
	-- a seal cloned from its parent's goes with it (a table that got a
	-- parent during the run keeps one of its own)
	SELECT 1 FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_trigger pt ON pt.tgrelid = i.inhparent AND pt.tgname = tg.tgname
	WHERE i.inhrelid = tg.tgrelid))
ORDER BY tg.tgrelid`, c.Schema, c.triggerName(), c.truncateName(), c.sealName())
	if err != nil {
		return fmt.Errorf("list capture triggers: %w", err)
	}
	type trig struct {
		oid           uint32
		schema, table string
		name          string
	}
	trigs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (trig, error) {
		var t trig
		return t, r.Scan(&t.oid, &t.schema, &t.table, &t.name)
	})
	if err != nil {
		return fmt.Errorf("list capture triggers: %w", err)
	}
	byTable := map[uint32][]trig{}
	var order []uint32
	for _, t := range trigs {
		if _, ok := byTable[t.oid]; !ok {
			order = append(order, t.oid)
		}
		byTable[t.oid] = append(byTable[t.oid], t)
	}
	deadline := time.Now().Add(opts.Timeout)
	for _, oid := range order {
		ts := byTable[oid]
		tbl := &schema.Table{OID: oid, Schema: ts[0].schema, Name: ts[0].table}
		var ddl strings.Builder
		for _, t := range ts {
			fmt.Fprintf(&ddl, "DROP TRIGGER IF EXISTS %s ON %s;\n", pgx.Identifier{t.name}.Sanitize(), tbl.QName())
		}
		if err := withLockRetry(ctx, conn, tbl, opts, deadline, ddl.String()); err != nil {
			return fmt.Errorf("remove change capture from %s: %w", tbl, err)
		}
	}
	rows, err = conn.Query(ctx, `
SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = $1 AND (p.proname LIKE 'capture\_%' OR p.proname IN ('capture_truncate', 'seal'))`, c.Schema)
	if err != nil {
		return err
	}
	fns, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	var ddl strings.Builder
	for _, fn := range fns {
		fmt.Fprintf(&ddl, "DROP FUNCTION IF EXISTS %s;\n", fn)
	}
	fmt.Fprintf(&ddl, "DROP TABLE IF EXISTS %s; DROP TABLE IF EXISTS %s;", c.q("changes"), c.q("capture_alive"))
	if _, err := conn.Exec(ctx, ddl.String()); err != nil {
		return fmt.Errorf("remove capture functions and tables: %w", err)
	}
	return nil
}

// Installed lists the oids of tables that carry the capture trigger.
func (c Capture) Installed(ctx context.Context, conn *pgx.Conn) ([]uint32, error) {
	rows, err := conn.Query(ctx, `SELECT tgrelid FROM pg_trigger WHERE tgname = $1 ORDER BY 1`, c.triggerName())
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[uint32])
}

// IntactSQL selects whether every one of the tables still carries both
// capture triggers, enabled ALWAYS: a trigger dropped, disabled or
// recreated differently during the run could have let a write escape.
func (c Capture) IntactSQL(tables []*schema.Table) string {
	oids := make([]string, len(tables))
	for i, t := range tables {
		oids[i] = fmt.Sprint(t.OID)
	}
	return fmt.Sprintf(`SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.unnest('{%[1]s}'::pg_catalog.oid[]) o(oid)
	WHERE (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger t WHERE t.tgrelid = o.oid AND t.tgname IN ('%[2]s', '%[3]s') AND t.tgenabled = 'A') <> 2)`,
		strings.Join(oids, ","), c.triggerName(), c.truncateName())
}

// AliveSQL selects whether capture is intact (see Alive).
func (c Capture) AliveSQL() string {
	return "SELECT EXISTS (SELECT 1 FROM " + c.q("capture_alive") + ")"
}

// Alive returns ErrLost if the change table lost its content in crash
// recovery, and nil if capture is intact.
func (c Capture) Alive(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) error {
	var alive bool
	err := q.QueryRow(ctx, c.AliveSQL()).Scan(&alive)
	if err != nil {
		return fmt.Errorf("check change capture: %w", err)
	}
	if !alive {
		return ErrLost
	}
	return nil
}

// RejectWritesSQL returns the statements that, run in the transaction that
// commits the switch, make every captured write fail from then on with
// message: the obsolete mark's enforcement. Writers that were blocked on the
// change table when that transaction commits fail too: the trigger is part
// of the table's definition, which they load once they get the lock.
func (c Capture) RejectWritesSQL(message string) []string {
	msg := strings.ReplaceAll(strings.ReplaceAll(message, "'", "''"), "%", "%%")
	fn := func(name string) string {
		return fmt.Sprintf(`CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
	RAISE EXCEPTION '%s' USING ERRCODE = 'read_only_sql_transaction';
END $f$`, c.q(name), msg)
	}
	return []string{
		fn("obsolete"),
		fmt.Sprintf("CREATE TRIGGER obsolete BEFORE INSERT ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()", c.q("changes"), c.q("obsolete")),
		fmt.Sprintf("ALTER TABLE %s ENABLE ALWAYS TRIGGER obsolete", c.q("changes")),
		fn("capture_truncate"),
		fn("seal"),
	}
}

// withLockRetry runs ddl in its own transaction with a short lock_timeout,
// retrying lock timeouts and deadlocks until deadline; then it fails naming
// the sessions that hold locks on the table.
func withLockRetry(ctx context.Context, conn *pgx.Conn, t *schema.Table, opts Options, deadline time.Time, ddl string) error {
	backoff := 10 * time.Millisecond
	lockTimeout := opts.LockTimeout
	for {
		lockTimeout = min(lockTimeout, max(time.Until(deadline), opts.LockTimeout))
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL lock_timeout = '%dms'", lockTimeout.Milliseconds())); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, ddl)
			return err
		})
		if err == nil {
			return nil
		}
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || (pgErr.Code != "55P03" && pgErr.Code != "40P01") {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: %s", ErrBlocked, Blockers(ctx, conn, t.OID))
		}
		if pgErr.Code == "55P03" {
			lockTimeout = min(2*lockTimeout, opts.MaxLockTimeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

// Blockers describes the sessions holding locks on a table (other than the
// caller's), for error messages that tell the operator whom to wait for.
func Blockers(ctx context.Context, conn *pgx.Conn, relid uint32) string {
	rows, err := conn.Query(ctx, `
SELECT DISTINCT a.pid, coalesce(a.application_name, ''), coalesce(a.usename::text, ''), coalesce(a.state, ''),
	coalesce(to_char(now() - a.xact_start, 'HH24:MI:SS'), ''), left(coalesce(a.query, ''), 80)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.relation = $1 AND l.granted AND l.pid <> pg_backend_pid()
ORDER BY a.pid`, relid)
	if err != nil {
		return "could not list them: " + err.Error()
	}
	var out []string
	for rows.Next() {
		var pid int32
		var app, user, state, age, query string
		if err := rows.Scan(&pid, &app, &user, &state, &age, &query); err != nil {
			return "could not list them: " + err.Error()
		}
		out = append(out, fmt.Sprintf("pid %d (user %q, application_name %q, %s, transaction open for %s, last query %q)", pid, user, app, state, age, query))
	}
	// Prepared transactions hold their locks without a session.
	rows, err = conn.Query(ctx, `SELECT DISTINCT p.gid, p.owner::text FROM pg_locks l JOIN pg_prepared_xacts p ON l.virtualtransaction = '-1/' || p.transaction::text
WHERE l.relation = $1 AND l.granted ORDER BY 1`, relid)
	if err == nil {
		for rows.Next() {
			var gid, owner string
			if rows.Scan(&gid, &owner) == nil {
				out = append(out, fmt.Sprintf("prepared transaction %q (owner %q: COMMIT PREPARED or ROLLBACK PREPARED it)", gid, owner))
			}
		}
		rows.Close()
	}
	if len(out) == 0 {
		return "sessions holding locks on the table (they have ended since)"
	}
	return "sessions holding locks on the table: " + strings.Join(out, "; ") + ": let them finish (or end them) and RESET"
}
