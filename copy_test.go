package swo

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgswo/swo/internal/capture"
	"github.com/pgswo/swo/internal/pgtest"
	"github.com/pgswo/swo/internal/replicate"
)

// awkwardTypes is shared by both databases.
const awkwardTypes = `
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (a int, b text);
CREATE SCHEMA billing;
`

// awkwardSource is a schema with what real services have: identity and
// generated columns, enums, domains, composite keys, text and uuid keys, a
// second schema, cascading foreign keys, a self reference, a deferred
// foreign key cycle, a dropped column, user triggers.
const awkwardSource = awkwardTypes + `
CREATE TABLE users (
	id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	gone text,
	email text NOT NULL UNIQUE,
	mood mood,
	score posint,
	shout text GENERATED ALWAYS AS (upper(email)) STORED
);
ALTER TABLE users DROP COLUMN gone;
CREATE INDEX users_mood ON users (mood);
CREATE TABLE billing.accounts (
	tenant text,
	num int,
	owner bigint REFERENCES users (id) ON DELETE CASCADE,
	balance numeric(14, 2) NOT NULL DEFAULT 0,
	PRIMARY KEY (tenant, num)
);
CREATE TABLE billing.invoices (
	id uuid PRIMARY KEY,
	tenant text NOT NULL,
	num int NOT NULL,
	amount numeric(12, 2),
	tags text[],
	FOREIGN KEY (tenant, num) REFERENCES billing.accounts ON DELETE CASCADE ON UPDATE CASCADE
);
CREATE TABLE a (id int PRIMARY KEY, b_id int, note text);
CREATE TABLE b (id int PRIMARY KEY, a_id int REFERENCES a (id) DEFERRABLE INITIALLY DEFERRED);
ALTER TABLE a ADD CONSTRAINT a_b FOREIGN KEY (b_id) REFERENCES b (id) DEFERRABLE INITIALLY DEFERRED;
CREATE TABLE tree (id int PRIMARY KEY, parent int REFERENCES tree (id) ON DELETE CASCADE, label text);
CREATE SEQUENCE free_counter;
CREATE TABLE events (id serial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), payload jsonb, pairs pair[]);
CREATE TABLE measurements (id int, region text, v int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE measurements_eu PARTITION OF measurements FOR VALUES IN ('eu');
CREATE TABLE measurements_us PARTITION OF measurements FOR VALUES IN ('us');
CREATE INDEX measurements_v ON measurements (v);
`

// awkwardTarget is the same schema in the new database with other column
// orders, no dropped column, and a user trigger that must not fire during
// the sync.
const awkwardTarget = awkwardTypes + `
CREATE TABLE users (
	shout text GENERATED ALWAYS AS (upper(email)) STORED,
	score posint,
	mood mood,
	email text NOT NULL UNIQUE,
	id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY
);
CREATE INDEX users_mood ON users (mood);
CREATE TABLE billing.accounts (
	balance numeric(14, 2) NOT NULL DEFAULT 0,
	owner bigint REFERENCES users (id) ON DELETE CASCADE,
	num int,
	tenant text,
	PRIMARY KEY (tenant, num)
);
CREATE TABLE billing.invoices (
	tags text[],
	amount numeric(12, 2),
	num int NOT NULL,
	tenant text NOT NULL,
	id uuid PRIMARY KEY,
	FOREIGN KEY (tenant, num) REFERENCES billing.accounts ON DELETE CASCADE ON UPDATE CASCADE
);
CREATE TABLE a (id int PRIMARY KEY, b_id int, note text);
CREATE TABLE b (id int PRIMARY KEY, a_id int REFERENCES a (id) DEFERRABLE INITIALLY DEFERRED);
ALTER TABLE a ADD CONSTRAINT a_b FOREIGN KEY (b_id) REFERENCES b (id) DEFERRABLE INITIALLY DEFERRED;
CREATE TABLE tree (id int PRIMARY KEY, parent int REFERENCES tree (id) ON DELETE CASCADE, label text);
CREATE SEQUENCE free_counter;
CREATE TABLE events (id serial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), payload jsonb, pairs pair[]);
CREATE FUNCTION no_writes() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'user trigger fired during the sync'; END $$;
CREATE TRIGGER guard BEFORE INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION no_writes();
CREATE TRIGGER guard_off BEFORE INSERT ON tree FOR EACH ROW EXECUTE FUNCTION no_writes();
ALTER TABLE tree DISABLE TRIGGER guard_off;
CREATE TABLE measurements (id int, region text, v int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE measurements_eu PARTITION OF measurements FOR VALUES IN ('eu');
CREATE TABLE measurements_us PARTITION OF measurements FOR VALUES IN ('us');
CREATE INDEX measurements_v ON measurements (v);
CREATE TRIGGER guard_parted BEFORE INSERT ON measurements FOR EACH ROW EXECUTE FUNCTION no_writes();
`

const awkwardSeed = `
INSERT INTO users (email, mood, score) SELECT 'u' || i || '@x', (ARRAY['sad','ok','happy'])[1 + i % 3]::mood, i FROM generate_series(1, 300) i;
INSERT INTO billing.accounts SELECT 't' || (i % 7), i, i, i * 1.5 FROM generate_series(1, 300) i;
INSERT INTO billing.invoices SELECT md5(i::text)::uuid, 't' || (i % 7), i, i / 3.0, ARRAY['x', NULL, 'y' || i] FROM generate_series(1, 300) i;
BEGIN;
INSERT INTO a SELECT i, i, 'a' || i FROM generate_series(1, 50) i;
INSERT INTO b SELECT i, i FROM generate_series(1, 50) i;
COMMIT;
INSERT INTO tree VALUES (1, NULL, 'root');
INSERT INTO tree SELECT i, i / 2, 'n' || i FROM generate_series(2, 200) i;
SELECT nextval('free_counter') FROM generate_series(1, 42);
INSERT INTO events (payload, pairs) SELECT jsonb_build_object('i', i), ARRAY[ROW(i, 'p')::pair, NULL] FROM generate_series(1, 100) i;
INSERT INTO measurements SELECT i, (ARRAY['eu', 'us'])[1 + i % 2], i FROM generate_series(1, 100) i;
`

// syncPair makes an old and a next database with the awkward schema and a
// switchover connector over them.
func syncPair(t *testing.T, owner bool) (old, next *pgtest.Database, c *Connector) {
	t.Helper()
	var opts []pgtest.DBOption
	if owner {
		opts = append(opts, pgtest.Owner("app"))
	}
	old = pgtest.NewDatabase(t, opts...)
	next = pgtest.NewDatabase(t, opts...)
	pgtest.Exec(t, old.URL, awkwardSource+awkwardSeed)
	pgtest.Exec(t, next.URL, awkwardTarget)
	c = newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, SyncWorkers: 3})
	return old, next, c
}

// runSync performs a whole sync run with the final step in a transaction on
// the old database, committed without switching.
func runSync(t *testing.T, c *Connector) *syncRun {
	t.Helper()
	ctx := testCtx(t)
	r, err := c.check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []struct {
		name string
		fn   func(context.Context) error
	}{{"check target", r.checkTarget}, {"capture", r.startCapture}, {"prepare", r.prepare}, {"initial copy", r.initialCopy}, {"catch up", r.catchUp}} {
		if err := step.fn(ctx); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
	}
	finalSync(t, r)
	if err := r.eng.Finish(ctx); err != nil {
		t.Fatal(err)
	}
	return r
}

func finalSync(t *testing.T, r *syncRun) replicate.FinalResult {
	t.Helper()
	ctx := testCtx(t)
	src, err := replicate.Connect(ctx, r.eng.Src)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close(context.Background())
	dst, err := replicate.Connect(ctx, r.eng.Dst)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close(context.Background())
	tx, err := src.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	res, err := r.final(ctx, tx, dst)
	if err != nil {
		t.Fatalf("final sync: %v", err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	return res
}

// verifyEqual checks with Connector.Verify, and with the package-level
// Verify, which must say the same, that the databases are equal.
func verifyEqual(t *testing.T, c *Connector) VerifyReport {
	t.Helper()
	rep, err := c.Verify(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Equal {
		t.Fatalf("databases differ after the sync:\n%s", rep)
	}
	alone, err := Verify(testCtx(t), c.cfg)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if alone.String() != rep.String() {
		t.Fatalf("Verify says\n%s\nConnector.Verify says\n%s", alone, rep)
	}
	return rep
}

func TestSyncAwkwardSchema(t *testing.T) {
	old, next, c := syncPair(t, false)
	runSync(t, c)
	rep := verifyEqual(t, c)
	pgtest.AssertSame(t, old, next, pgtest.CompareOptions{})
	if len(rep.Tables) != 9 {
		t.Fatalf("verified %d tables, want 9: %+v", len(rep.Tables), rep.Tables)
	}
	ctx := testCtx(t)
	nc := pgtest.Connect(t, next.URL)
	// Sequences carried over, free-standing and owned.
	var free, ev int64
	if err := nc.QueryRow(ctx, "SELECT last_value FROM free_counter").Scan(&free); err != nil || free != 42 {
		t.Fatalf("free_counter = %d, %v; want 42", free, err)
	}
	if err := nc.QueryRow(ctx, "SELECT nextval('events_id_seq')").Scan(&ev); err != nil || ev != 101 {
		t.Fatalf("events_id_seq next = %d, %v; want 101", ev, err)
	}
	var uid int64
	if err := nc.QueryRow(ctx, "SELECT nextval(pg_get_serial_sequence('users', 'id'))").Scan(&uid); err != nil || uid != 301 {
		t.Fatalf("users identity next = %d, %v; want 301", uid, err)
	}
	// The target's schema is whole again: keys, indexes, validated foreign
	// keys, triggers with their original states.
	assertTargetIntact(t, next)
	var guard, guardOff string
	if err := nc.QueryRow(ctx, "SELECT (SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'guard'), (SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'guard_off')").Scan(&guard, &guardOff); err != nil {
		t.Fatal(err)
	}
	if guard != "O" || guardOff != "D" {
		t.Fatalf("trigger states guard=%s guard_off=%s, want O and D", guard, guardOff)
	}
	// The change table is empty: everything was applied.
	var left int
	if err := pgtest.Connect(t, old.URL).QueryRow(ctx, "SELECT count(*) FROM swo.changes").Scan(&left); err != nil || left != 0 {
		t.Fatalf("%d changes left, %v", left, err)
	}
}

// assertTargetIntact checks the target's constraints, indexes and foreign
// keys against the schema it was created with.
func assertTargetIntact(t *testing.T, next *pgtest.Database) {
	t.Helper()
	ctx := testCtx(t)
	nc := pgtest.Connect(t, next.URL)
	var pk, uq, fk, notValid, ix, pending int
	err := nc.QueryRow(ctx, `SELECT
		count(*) FILTER (WHERE contype = 'p'), count(*) FILTER (WHERE contype = 'u'),
		count(*) FILTER (WHERE contype = 'f'), count(*) FILTER (WHERE contype = 'f' AND NOT convalidated),
		(SELECT count(*) FROM pg_indexes WHERE indexname = 'users_mood'),
		(SELECT count(*) FROM swo.target_undo)
		FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname IN ('public', 'billing')`).
		Scan(&pk, &uq, &fk, &notValid, &ix, &pending)
	if err != nil {
		t.Fatal(err)
	}
	if pk != 10 || uq != 1 || fk != 5 || notValid != 0 || ix != 1 || pending != 0 {
		t.Fatalf("target schema: %d primary keys (want 10), %d unique (1), %d foreign keys (5), %d not validated (0), users_mood %d (1), %d undo records (0)",
			pk, uq, fk, notValid, ix, pending)
	}
}

// workload applies concurrent changes to the old database: inserts, updates,
// deletes with cascades, primary key changes (cascading to children), unique
// values moved between rows and swapped, foreign key cycles changed. It
// returns the number of committed transactions when stopped.
type workload struct {
	pool    *pgxpool.Pool
	stop    chan struct{}
	wg      sync.WaitGroup
	commits atomic.Int64
	errs    chan error
	next    atomic.Int64
}

func startWorkload(t *testing.T, url string, writers int) *workload {
	t.Helper()
	pool, err := pgxpool.New(testCtx(t), url)
	if err != nil {
		t.Fatal(err)
	}
	w := &workload{pool: pool, stop: make(chan struct{}), errs: make(chan error, writers)}
	w.next.Store(100000)
	for i := 0; i < writers; i++ {
		w.wg.Add(1)
		go w.run(int64(i))
	}
	t.Cleanup(func() { w.halt(t); pool.Close() })
	return w
}

func (w *workload) halt(t *testing.T) {
	select {
	case <-w.stop:
		return
	default:
	}
	close(w.stop)
	w.wg.Wait()
	close(w.errs)
	for err := range w.errs {
		t.Errorf("workload: %v", err)
	}
}

func (w *workload) run(seed int64) {
	defer w.wg.Done()
	rnd := rand.New(rand.NewSource(seed))
	ctx := context.Background()
	for {
		select {
		case <-w.stop:
			return
		default:
		}
		n := w.next.Add(1)
		var sqls []string
		switch rnd.Intn(10) {
		case 0: // new user, account, invoices
			sqls = []string{
				fmt.Sprintf("INSERT INTO users (email, mood, score) VALUES ('n%d@x', 'ok', %d)", n, n),
				fmt.Sprintf("INSERT INTO billing.accounts VALUES ('w', %d, (SELECT id FROM users WHERE email = 'n%d@x'), 1)", n, n),
				fmt.Sprintf("INSERT INTO billing.invoices VALUES (md5('w%d')::uuid, 'w', %d, 9.99, '{a,NULL}')", n, n),
			}
		case 1: // update non-key values
			sqls = []string{fmt.Sprintf("UPDATE users SET mood = 'happy', score = %d WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1)", 1+rnd.Intn(1000))}
		case 2: // delete a user: cascades to accounts and invoices
			sqls = []string{"DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1)"}
		case 3: // primary key change, cascading to invoices
			sqls = []string{fmt.Sprintf("UPDATE billing.accounts SET num = %d WHERE (tenant, num) = (SELECT tenant, num FROM billing.accounts ORDER BY random() LIMIT 1)", n)}
		case 4: // swap unique emails between two users
			sqls = []string{`WITH p AS (SELECT id, email FROM users ORDER BY random() LIMIT 2)
				UPDATE users SET email = 'tmp' || users.id WHERE id IN (SELECT id FROM p)`}
			sqls = []string{
				"CREATE TEMP TABLE IF NOT EXISTS sw (id bigint, email text)",
				"TRUNCATE sw",
				"INSERT INTO sw SELECT id, email FROM users ORDER BY random() LIMIT 2",
				"UPDATE users SET email = 'tmp' || id WHERE id IN (SELECT id FROM sw)",
				"UPDATE users u SET email = (SELECT s.email FROM sw s WHERE s.id <> u.id) WHERE id IN (SELECT id FROM sw)",
			}
		case 5: // move a unique email to a new row: delete and re-insert under a new key
			sqls = []string{
				"CREATE TEMP TABLE IF NOT EXISTS mv (email text)",
				"TRUNCATE mv",
				"WITH d AS (DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1) RETURNING email) INSERT INTO mv SELECT email FROM d",
				"INSERT INTO users (email, mood) SELECT email, 'sad' FROM mv",
			}
		case 6: // foreign key cycle: new pair, re-linked
			sqls = []string{
				"SET CONSTRAINTS ALL DEFERRED",
				fmt.Sprintf("INSERT INTO a VALUES (%d, %d, 'new')", n, n),
				fmt.Sprintf("INSERT INTO b VALUES (%d, %d)", n, n),
				fmt.Sprintf("UPDATE a SET b_id = %d WHERE id = (SELECT id FROM a ORDER BY random() LIMIT 1)", n),
			}
		case 7: // tree: new leaf, reparent, delete a subtree
			sqls = []string{
				fmt.Sprintf("INSERT INTO tree VALUES (%d, (SELECT id FROM tree ORDER BY random() LIMIT 1), 'leaf')", n),
				"DELETE FROM tree WHERE id = (SELECT id FROM tree WHERE id > 1 ORDER BY random() LIMIT 1)",
			}
		case 8: // the parent changes, children have ON DELETE CASCADE: must not be deleted and re-inserted
			sqls = []string{"UPDATE billing.accounts SET balance = balance + 1 WHERE (tenant, num) = (SELECT tenant, num FROM billing.invoices ORDER BY random() LIMIT 1)"}
		case 9:
			sqls = []string{
				// Row movement between partitions, and a write through the parent.
				"UPDATE measurements SET region = CASE region WHEN 'eu' THEN 'us' ELSE 'eu' END, v = v + 1 WHERE id = (SELECT id FROM measurements ORDER BY random() LIMIT 1)",
				fmt.Sprintf("INSERT INTO measurements VALUES (%d, 'eu', 0)", n),

				fmt.Sprintf("INSERT INTO events (payload, pairs) VALUES ('{\"n\": %d}', ARRAY[ROW(%d, 'q')::pair])", n, n),
				"SELECT nextval('free_counter')",
				"UPDATE events SET payload = payload || '{\"u\": 1}' WHERE id = (SELECT id FROM events ORDER BY random() LIMIT 1)",
			}
		}
		err := pgx.BeginFunc(ctx, w.pool, func(tx pgx.Tx) error {
			for _, s := range sqls {
				if _, err := tx.Exec(ctx, s); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			// Unique and foreign-key races between writers are the workload's
			// own conflicts; anything else is a failure of the test.
			if s := err.Error(); strings.Contains(s, "23505") || strings.Contains(s, "23503") || strings.Contains(s, "40P01") || strings.Contains(s, "40001") || strings.Contains(s, "23502") {
				continue
			}
			w.errs <- err
			return
		}
		w.commits.Add(1)
	}
}

func TestSyncUnderConcurrentWrites(t *testing.T) {
	old, next, c := syncPair(t, false)
	ctx := testCtx(t)
	w := startWorkload(t, old.URL, 4)
	waitFor(t, func() bool { return w.commits.Load() > 50 })
	r, err := c.check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []func(context.Context) error{r.checkTarget, r.startCapture, r.prepare, r.initialCopy, r.catchUp, r.catchUp} {
		if err := step(ctx); err != nil {
			t.Fatal(err)
		}
	}
	before := w.commits.Load()
	waitFor(t, func() bool { return w.commits.Load() > before+100 })
	w.halt(t)
	res := finalSync(t, r)
	if err := r.eng.Finish(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d transactions during the sync; final sync applied %d changes in %v", w.commits.Load(), res.Changes, res.Duration)
	verifyEqual(t, c)
	pgtest.AssertSame(t, old, next, pgtest.CompareOptions{})
}

func TestSyncLosslessValues(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	ddl := `
CREATE TYPE color AS ENUM ('red', 'green');
CREATE DOMAIN short_text AS varchar(20);
CREATE TYPE money_pair AS (amount numeric, cur text);
CREATE TABLE vals (
	id int PRIMARY KEY,
	i2 smallint, i4 int, i8 bigint, num numeric, f4 real, f8 double precision, m money,
	t text, vc varchar(10), ch char(5), by bytea, bo boolean,
	d date, ts timestamp, tstz timestamptz, tm time, tmtz timetz, iv interval,
	u uuid, j json, jb jsonb, x xml,
	ip inet, cidr_ cidr, mac macaddr, mac8 macaddr8,
	pt point, ln line, ls lseg, bx box, pa path, pg polygon, ci circle,
	bt bit(3), vb varbit, tv tsvector, tq tsquery,
	r4 int4range, rn numrange, rtz tstzrange, rd daterange, mr int4multirange,
	a1 int[], a2 int[][], at text[], ae color[], e color, dom short_text,
	comp money_pair, comps money_pair[], o oid, lsn pg_lsn
);`
	pgtest.Exec(t, old.URL, ddl)
	pgtest.Exec(t, next.URL, ddl)
	pgtest.Exec(t, old.URL, `
INSERT INTO vals VALUES
(1, -32768, -2147483648, -9223372036854775808, 'NaN', 'NaN', 'NaN', '-92233720368547758.08',
 E'tab\there\nnewline \\ backslash ''quote'' "dq" ünïcødé 🐘', 'ten chars!', 'ab', E'\\x00ff00010203', true,
 'infinity', 'infinity', '-infinity', '24:00:00', '00:00:00+1459', '-178000000 years',
 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{ "b":1,  "a" : [1, 2.50, 1e400], "a":"dup" }', '{"z": 1, "a": [1.0, 2]}', '<a x="1">t&amp;</a>',
 '::ffff:1.2.3.4/100', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05',
 '(1.5,-2)', '{1,-1,0}', '[(0,0),(1,1)]', '(1,1),(0,0)', '((0,0),(1,1),(2,0))', '((0,0),(1,1),(2,0))', '<(1,1),5>',
 B'101', B'1', 'a fat:2 cat', 'fat & rat', '[1,5)', '(0.1,2.5]', '[2020-01-01 00:00+00,infinity)', '[2020-01-01,2020-02-01)', '{[1,3),[5,7)}',
 '{1,NULL,3}', '{{1,2},{NULL,4}}', '{"NULL",NULL,"", "a,b", "q\"uote"}', '{red,NULL,green}', 'green', 'short',
 ROW(1.5, 'EUR'), ARRAY[ROW(1, 'a')::money_pair, NULL, ROW(NULL, NULL)::money_pair], 4294967295, '16/B374D848'),
(2, 0, 0, 0, '123456789012345678901234567890.123456789012345678901234567890', 'Infinity', '-Infinity', 0,
 '', '', '', '', false,
 '4713-01-01 BC', '-infinity', 'infinity', '00:00', '23:59:59.999999-1459', '1 day -1 second',
 '00000000-0000-0000-0000-000000000000', '[]', '[]', '',
 '0.0.0.0', '::/0', '00:00:00:00:00:00', '00:00:00:00:00:00:00:00',
 '(0,0)', '{0,1,0}', '[(0,0),(0,0)]', '(0,0),(0,0)', '[(0,0)]', '((0,0))', '<(0,0),0>',
 B'000', B'', '', '', 'empty', 'empty', 'empty', 'empty', '{}',
 '{}', '{{NULL}}', '{}', '{}', 'red', '',
 ROW(NULL, NULL), '{}', 0, '0/0'),
(3, 1, 1, 1, '-0.000000000000000000000000000000000000000000001', '-0', '-0', 1.5,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL);
INSERT INTO vals (id, num, f4, f8, m, t, by, j) VALUES
(4, 1e-300, 3.4028235e38, 1.7976931348623157e308, 0.01, repeat('toast me ', 200000), decode(repeat('00ff', 500000), 'hex'), (repeat('[1,', 1000) || '1' || repeat(']', 1000))::json);
UPDATE vals SET f8 = 0.1 + 0.2, f4 = 1.1 WHERE id = 3;`)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	runSync(t, c)
	verifyEqual(t, c)
	pgtest.AssertSame(t, old, next, pgtest.CompareOptions{})
	// Beyond digests: every row's text form is identical, json text included.
	ctx := testCtx(t)
	q := "SELECT id, v::text, j::text FROM vals v ORDER BY id"
	oc, nc := pgtest.Connect(t, old.URL), pgtest.Connect(t, next.URL)
	for _, conn := range []*pgx.Conn{oc, nc} {
		if _, err := conn.Exec(ctx, "SET extra_float_digits = 3"); err != nil {
			t.Fatal(err)
		}
	}
	or, err := oc.Query(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	type row struct {
		id   int
		v, j *string
	}
	collect := func(rows pgx.Rows) []row {
		out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
			var x row
			return x, r.Scan(&x.id, &x.v, &x.j)
		})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	oldRows := collect(or)
	nr, err := nc.Query(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	newRows := collect(nr)
	if len(oldRows) != 4 || len(newRows) != 4 {
		t.Fatalf("rows: %d old, %d new", len(oldRows), len(newRows))
	}
	for i := range oldRows {
		o, n := oldRows[i], newRows[i]
		if (o.v == nil) != (n.v == nil) || (o.v != nil && *o.v != *n.v) {
			t.Errorf("row %d differs:\nold %s\nnew %s", o.id, abbrev(o.v), abbrev(n.v))
		}
		if (o.j == nil) != (n.j == nil) || (o.j != nil && *o.j != *n.j) {
			t.Errorf("row %d: json text not kept as written: %s vs %s", o.id, abbrev(o.j), abbrev(n.j))
		}
	}
	var nullText, emptyText bool
	if err := nc.QueryRow(ctx, "SELECT (SELECT t IS NULL FROM vals WHERE id = 3), (SELECT t = '' FROM vals WHERE id = 2)").Scan(&nullText, &emptyText); err != nil || !nullText || !emptyText {
		t.Fatalf("NULL vs empty string lost: null=%v empty=%v err=%v", nullText, emptyText, err)
	}
}

func abbrev(s *string) string {
	if s == nil {
		return "NULL"
	}
	if len(*s) > 300 {
		return (*s)[:300] + "…"
	}
	return *s
}

func TestPreconditionsNameEveryObject(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	pgtest.Exec(t, old.URL, `
CREATE TABLE only_old (id int PRIMARY KEY);
CREATE TABLE nokey (v int);
CREATE TABLE cols (id int PRIMARY KEY, a int, b text, c int);
CREATE TABLE keys (a int, b int, PRIMARY KEY (a, b));
CREATE TABLE gen (id int PRIMARY KEY, g int GENERATED ALWAYS AS (id * 2) STORED);
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, p int REFERENCES parent);
CREATE SEQUENCE seq_only_old;`)
	pgtest.Exec(t, next.URL, `
CREATE TABLE nokey (v int);
CREATE TABLE cols (id int PRIMARY KEY, a bigint, c int, extra int NOT NULL);
CREATE TABLE keys (a int, b int, PRIMARY KEY (b, a));
CREATE TABLE gen (id int PRIMARY KEY, g int);
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, p int REFERENCES parent);`)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, ExcludeTables: []string{"public.parent"}})
	_, err := c.check(testCtx(t))
	if !errors.Is(err, ErrPreconditions) {
		t.Fatalf("err = %v, want ErrPreconditions", err)
	}
	var pe *PreconditionError
	if !errors.As(err, &pe) {
		t.Fatalf("error carries no problem list: %v", err)
	}
	ps := pe.Problems
	want := map[string]string{
		"public.only_old":     "table missing",
		"public.nokey":        "no primary key",
		"public.cols.a":       "type integer in the old database, bigint in the new one",
		"public.cols.b":       "column missing",
		"public.cols.extra":   "NOT NULL and without a default",
		"public.keys":         "primary key (a, b) in the old database, (b, a) in the new one",
		"public.gen.g":        "generated in one database",
		"public.child":        "references excluded table public.parent",
		"public.seq_only_old": "sequence missing",
	}
	for obj, issue := range want {
		found := false
		for _, p := range ps {
			if p.Object == obj && strings.Contains(p.Issue, issue) {
				found = true
			}
		}
		if !found {
			t.Errorf("no problem %q on %s in:\n%v", issue, obj, err)
		}
	}
	if len(ps) != len(want) {
		t.Errorf("%d problems, want %d:\n%v", len(ps), len(want), err)
	}
	// Nothing was changed by the check.
	var n int
	if err := pgtest.Connect(t, old.URL).QueryRow(testCtx(t), "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal").Scan(&n); err != nil || n != 0 {
		t.Fatalf("check left %d triggers, %v", n, err)
	}
}

func TestPreconditionPrivilegesAndSameDatabase(t *testing.T) {
	old := pgtest.NewDatabase(t, pgtest.Owner("app"))
	next := pgtest.NewDatabase(t, pgtest.Owner("app"))
	// A table the old database's role does not own and may not read.
	pgtest.Exec(t, old.AdminURL(), "CREATE TABLE secret (id int PRIMARY KEY)")
	pgtest.Exec(t, next.AdminURL(), "CREATE TABLE secret (id int PRIMARY KEY)")
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	_, err := c.check(testCtx(t))
	for _, want := range []string{"public.secret: the old database's role may not SELECT", "public.secret: the old database's role does not own it", "public.secret: the new database's role does not own it"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in %v", want, err)
		}
	}
	// The TRIGGER privilege is not enough: capture enables its triggers
	// ALWAYS, which needs ownership (RESET passed and EXECUTE failed with
	// "must be owner").
	pgtest.Exec(t, old.AdminURL(), "CREATE TABLE shared (id int PRIMARY KEY); GRANT SELECT, TRIGGER ON shared TO "+old.Owner)
	pgtest.Exec(t, next.URL, "CREATE TABLE shared (id int PRIMARY KEY)")
	_, err = c.check(testCtx(t))
	if err == nil || !strings.Contains(err.Error(), "public.shared: the old database's role does not own it") {
		t.Errorf("a table with only the TRIGGER privilege passed: %v", err)
	}
	// Same database through two URLs.
	d := pgtest.NewDatabase(t)
	pgtest.Exec(t, d.URL, "CREATE TABLE t (id int PRIMARY KEY)")
	c2 := newConnector(t, Config{OldURL: d.URL, NextURL: strings.Replace(d.URL, "127.0.0.1", "localhost", 1)})
	if _, err := c2.check(testCtx(t)); err == nil || !strings.Contains(err.Error(), "database: --db-url and --db-url-next (Config.OldURL and Config.NextURL) reach the same database") {
		t.Fatalf("same database not refused: %v", err)
	}
}

func TestTargetWithForeignDataIsRefused(t *testing.T) {
	old, next, c := syncPair(t, false)
	ctx := testCtx(t)
	pgtest.Exec(t, next.URL, "ALTER TABLE users DISABLE TRIGGER guard; INSERT INTO users (email) VALUES ('someone@else'); ALTER TABLE users ENABLE TRIGGER guard")
	r, err := c.check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	err = r.checkTarget(ctx)
	if !errors.Is(err, ErrTargetNotEmpty) || !strings.Contains(err.Error(), "public.users (1 rows; 300 in the old database)") {
		t.Fatalf("err = %v", err)
	}
	// Identical content is fine: make tree equal on both sides.
	pgtest.Exec(t, next.URL, "ALTER TABLE users DISABLE TRIGGER guard; DELETE FROM users; ALTER TABLE users ENABLE TRIGGER guard")
	pgtest.Exec(t, next.URL, "INSERT INTO tree VALUES (1, NULL, 'root')")
	pgtest.Exec(t, old.URL, "DELETE FROM tree WHERE id > 1")
	r, _ = c.check(ctx)
	if err := r.checkTarget(ctx); err != nil {
		t.Fatalf("identical content refused: %v", err)
	}
	if !r.keep["public.tree"] || len(r.keep) != 1 {
		t.Fatalf("keep = %v, want public.tree", r.keep)
	}
	// With AllowClearTarget, differing data may be cleared.
	pgtest.Exec(t, next.URL, "UPDATE tree SET label = 'mine'")
	c2 := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, AllowClearTarget: true})
	r2, _ := c2.check(ctx)
	if err := r2.checkTarget(ctx); err != nil {
		t.Fatalf("AllowClearTarget: %v", err)
	}
}

// TestAbortAtEachStepLeavesBothDatabasesAsBefore stops a run after each step
// and checks that cleanup leaves no capture on the old database and the new
// one with its schema, triggers and (empty) tables as before.
func TestAbortAtEachStepLeavesBothDatabasesAsBefore(t *testing.T) {
	steps := []string{"capture", "prepare", "initial copy", "catch up", "final"}
	for n := 1; n <= len(steps); n++ {
		t.Run("after "+steps[n-1], func(t *testing.T) {
			old, next, c := syncPair(t, true)
			ctx := testCtx(t)
			before := targetShape(t, next)
			r, err := c.check(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := r.checkTarget(ctx); err != nil {
				t.Fatal(err)
			}
			fns := []func(context.Context) error{r.startCapture, r.prepare, r.initialCopy, r.catchUp, func(ctx context.Context) error {
				// The final sync commits the target, but the old database's
				// transaction (which would mark the switch) rolls back.
				src, _ := replicate.Connect(ctx, r.eng.Src)
				defer src.Close(context.Background())
				dst, _ := replicate.Connect(ctx, r.eng.Dst)
				defer dst.Close(context.Background())
				tx, err := src.Begin(ctx)
				if err != nil {
					return err
				}
				defer tx.Rollback(ctx) //nolint:errcheck
				_, err = r.final(ctx, tx, dst)
				return err
			}}
			for i := 0; i < n; i++ {
				if err := fns[i](ctx); err != nil {
					t.Fatalf("%s: %v", steps[i], err)
				}
			}
			if err := c.cleanup(ctx); err != nil {
				t.Fatalf("cleanup: %v", err)
			}
			if err := c.cleanup(ctx); err != nil {
				t.Fatalf("cleanup is not idempotent: %v", err)
			}
			oc := pgtest.Connect(t, old.URL)
			var trig int
			var changes *string
			if err := oc.QueryRow(ctx, "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'swo%'), to_regclass('swo.changes')::text").Scan(&trig, &changes); err != nil {
				t.Fatal(err)
			}
			if trig != 0 || changes != nil {
				t.Fatalf("old database keeps %d capture triggers, change table %v", trig, changes)
			}
			if after := targetShape(t, next); after != before {
				t.Fatalf("new database changed:\nbefore %s\nafter  %s", before, after)
			}
			// The old database accepts TRUNCATE again (capture gone).
			pgtest.Exec(t, old.URL, "TRUNCATE events")
		})
	}
}

// targetShape renders what an abort must restore: constraints, indexes,
// trigger states, and row counts.
func targetShape(t *testing.T, d *pgtest.Database) string {
	t.Helper()
	var s string
	err := pgtest.Connect(t, d.URL).QueryRow(testCtx(t), `SELECT
		(SELECT string_agg(conname || ':' || contype::text || ':' || convalidated, ',' ORDER BY conname) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname IN ('public', 'billing')) || ' | ' ||
		(SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE schemaname IN ('public', 'billing')) || ' | ' ||
		(SELECT string_agg(tgname || ':' || tgenabled::text, ',' ORDER BY tgname) FROM pg_trigger WHERE NOT tgisinternal) || ' | ' ||
		(SELECT count(*) FROM users) || ',' || (SELECT count(*) FROM billing.accounts) || ',' || (SELECT count(*) FROM billing.invoices) || ',' ||
		(SELECT count(*) FROM a) || ',' || (SELECT count(*) FROM b) || ',' || (SELECT count(*) FROM tree) || ',' || (SELECT count(*) FROM events) || ',' ||
		(SELECT count(*) FROM measurements)`).Scan(&s)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestTruncateRefusedDuringCapture(t *testing.T) {
	old, _, c := syncPair(t, false)
	ctx := testCtx(t)
	r, err := c.check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.startCapture(ctx); err != nil {
		t.Fatal(err)
	}
	_, err = pgtest.Connect(t, old.URL).Exec(ctx, "TRUNCATE events")
	if err == nil || !strings.Contains(err.Error(), "TRUNCATE of public.events refused: a database switchover is in progress") {
		t.Fatalf("TRUNCATE during capture: %v", err)
	}
	if err := c.cleanup(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestCaptureWaitsForWritersAndNamesThemOnTimeout(t *testing.T) {
	old, _, c := syncPair(t, false)
	ctx := testCtx(t)
	c.cfg.CaptureTimeout = 2 * time.Second
	r, err := c.check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// An open transaction that wrote to tree before capture starts.
	blocker := pgtest.Connect(t, old.URL)
	if _, err := blocker.Exec(ctx, "SET application_name = 'long-writer'"); err != nil {
		t.Fatal(err)
	}
	tx, err := blocker.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "UPDATE tree SET label = 'held' WHERE id = 2"); err != nil {
		t.Fatal(err)
	}
	// While capture waits for it, other writers of the same table must not
	// queue behind the capture's lock request for the whole wait: each
	// attempt gives up after a short lock_timeout and lets them through.
	done := make(chan error, 1)
	go func() { done <- r.startCapture(ctx) }()
	other := pgtest.Connect(t, old.URL)
	var worst time.Duration
	for i := 0; i < 10; i++ {
		start := time.Now()
		if _, err := other.Exec(ctx, "UPDATE tree SET label = 'ok' WHERE id = 3"); err != nil {
			t.Fatal(err)
		}
		worst = max(worst, time.Since(start))
		time.Sleep(100 * time.Millisecond)
	}
	err = <-done
	if !errors.Is(err, capture.ErrBlocked) || !strings.Contains(err.Error(), "long-writer") || !strings.Contains(err.Error(), "public.tree") {
		t.Fatalf("err = %v, want ErrBlocked naming the session and the table", err)
	}
	if worst >= c.cfg.CaptureTimeout/2 {
		t.Errorf("another writer of the table waited %v behind capture installation (capture waited %v in all)", worst, c.cfg.CaptureTimeout)
	}
	t.Logf("another writer of the table waited at most %v while capture waited %v", worst, c.cfg.CaptureTimeout)
	// Once the writer commits, capture installs and the write is in the copy.
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	c.cfg.CaptureTimeout = 10 * time.Second
	if err := r.startCapture(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.cleanup(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestAbortLeavesKeptTablesClearable: a target table whose rows equalled the
// source's is loaded again and left filled by an abort; once the source
// moves on, the next RESET must not refuse it as data swo did not write.
func TestAbortLeavesKeptTablesClearable(t *testing.T) {
	old, next, c := syncPair(t, false)
	ctx := testCtx(t)
	pgtest.Exec(t, next.URL, "INSERT INTO tree VALUES (1, NULL, 'root')")
	pgtest.Exec(t, old.URL, "DELETE FROM tree WHERE id > 1")
	r, err := c.check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []func(context.Context) error{r.checkTarget, r.startCapture, r.prepare, r.initialCopy} {
		if err := step(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if !r.keep["public.tree"] {
		t.Fatalf("keep = %v, want public.tree", r.keep)
	}
	if err := c.cleanup(ctx); err != nil { // the abort
		t.Fatal(err)
	}
	pgtest.Exec(t, old.URL, "UPDATE tree SET label = 'renamed'")
	r, err = c.check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.checkTarget(ctx); err != nil {
		t.Fatalf("RESET after an abort refused the table the run left filled: %v", err)
	}
	// A table with rows swo never wrote is still refused.
	pgtest.Exec(t, next.URL, "ALTER TABLE users DISABLE TRIGGER guard; INSERT INTO users (email) VALUES ('someone@else'); ALTER TABLE users ENABLE TRIGGER guard")
	if err := r.checkTarget(ctx); !errors.Is(err, ErrTargetNotEmpty) || strings.Contains(err.Error(), "public.tree") {
		t.Fatalf("foreign rows after an abort: %v", err)
	}
}
