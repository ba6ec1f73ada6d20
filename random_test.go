package swo

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgswo/swo/internal/pgtest"
)

// Randomised differential testing: a generator of schemas (key shapes and
// types, partitions, inheritance, foreign keys with cascades and cycles,
// generated, identity and serial columns, sequences in every state, row
// level security, unlogged and excluded tables) and of concurrent workloads
// (writers through the connector, and writers that bypass it as another
// role with other session settings and isolation levels, or as a superuser
// replaying changes with session_replication_role = replica). Each run is a
// whole switchover that ends with the independent checker: the new database
// must hold exactly what the old one held when the switch committed.
//
// go test runs a few fixed seeds. A long run:
//
//	SWO_RANDOM_RUNS=200 go test -run TestRandomSwitchovers -timeout 2h .
//
// draws new seeds and prints each; a failure names its seed, which replays
// with SWO_RANDOM_SEED=<seed>.

// keyType is a type a generated primary key column may have: its SQL type
// and the SQL expression of its n-th value (injective in n).
type keyType struct {
	sql  string
	expr func(n string) string
}

var keyTypes = []keyType{
	{"int", func(n string) string { return n }},
	{"bigint", func(n string) string { return "(" + n + ")::bigint * 1000000007" }},
	{"text", func(n string) string { return `'k '' ,\é ' || (` + n + ")" }},
	{"uuid", func(n string) string { return "md5((" + n + ")::text)::uuid" }},
	{"timestamp(3)", func(n string) string {
		return "('2024-03-05 10:00:00.123'::timestamp + (" + n + ") * interval '1 day 1 millisecond')"
	}},
	{"timestamptz", func(n string) string {
		return "('2024-03-05 10:00:00.5+00'::timestamptz + (" + n + ") * interval '1 hour 1 microsecond')"
	}},
	{"day", func(n string) string { return "('2024-01-01'::date + (" + n + "))::day" }},
	{"numeric", func(n string) string { return "((" + n + ") / 7.0)" }},
	{"float8", func(n string) string { return "((" + n + ") * 0.1 + 0.2)::float8" }},
	{"real", func(n string) string { return "((" + n + ") * 0.1)::real" }},
	{"interval", func(n string) string { return "((" + n + ") * interval '1 day 2 hours 3.5 seconds')" }},
	{"bytea", func(n string) string { return "decode(md5((" + n + ")::text), 'hex')" }},
	{"pair", func(n string) string { return "ROW((" + n + "), 'p' || (" + n + "))::pair" }},
	{"tstzrange", func(n string) string {
		return "tstzrange('2024-01-01 00:00:00+00'::timestamptz + (" + n + ") * interval '1 hour', NULL)"
	}},
}

// moodKey is a low-cardinality key type, only for columns after the first.
var moodKey = keyType{"mood", func(n string) string { return "(ARRAY['sad', 'ok', 'happy']::mood[])[1 + (" + n + ") % 3]" }}

const randomTypes = `
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN day AS date;
CREATE TYPE pair AS (a int, b text);
`

// genTable is one generated table.
type genTable struct {
	name     string
	key      []keyType
	parted   bool   // hash-partitioned on its first key column
	child    string // an inheritance child ("" if none), with the same key
	unlogged bool
	serial   bool // has a serial column ser
	ident    bool // has an identity column ident (BY DEFAULT)
	gen      bool // has a generated column g
	refs     []genRef
	excluded bool
}

// genRef is a foreign key from a table to another's key.
type genRef struct {
	to       *genTable
	cols     []string
	deferred bool
	onDelete string
}

type genSchema struct {
	tables    []*genTable
	sequences []string
	ddl, seed string
	exclude   []string
	seedRows  int
}

func (t *genTable) keyCols() []string {
	cols := make([]string, len(t.key))
	for i := range t.key {
		cols[i] = fmt.Sprintf("k%d", i+1)
	}
	return cols
}

// keyExpr renders the key of the n-th row, as a row constructor.
func (t *genTable) keyExpr(n string) string {
	parts := make([]string, len(t.key))
	for i, k := range t.key {
		parts[i] = k.expr(fmt.Sprintf("(%s) * %d + %d", n, i+1, i))
	}
	return strings.Join(parts, ", ")
}

func generateSchema(rnd *rand.Rand) *genSchema {
	g := &genSchema{seedRows: 20 + rnd.Intn(150)}
	var ddl, seed strings.Builder
	ddl.WriteString(randomTypes)
	n := 2 + rnd.Intn(4)
	for i := 0; i < n; i++ {
		t := &genTable{name: fmt.Sprintf("t%d", i)}
		t.key = append(t.key, keyTypes[rnd.Intn(len(keyTypes))])
		for len(t.key) < 3 && rnd.Intn(3) == 0 {
			if rnd.Intn(4) == 0 {
				t.key = append(t.key, moodKey)
			} else {
				t.key = append(t.key, keyTypes[rnd.Intn(len(keyTypes))])
			}
		}
		switch rnd.Intn(6) {
		case 0:
			t.parted = true
		case 1:
			t.child = t.name + "_child"
		case 2:
			t.unlogged = true
		}
		t.serial, t.ident, t.gen = rnd.Intn(3) == 0, rnd.Intn(3) == 0, rnd.Intn(3) == 0
		g.tables = append(g.tables, t)
	}
	// Foreign keys between unpartitioned tables (partitioned ones are refused
	// by the preconditions), some in cycles, deferred.
	for i, t := range g.tables {
		for j, to := range g.tables {
			if i == j || t.parted || to.parted || t.unlogged != to.unlogged || rnd.Intn(4) != 0 {
				continue
			}
			r := genRef{to: to, deferred: j > i, onDelete: []string{"CASCADE", "SET NULL", "NO ACTION"}[rnd.Intn(3)]}
			if r.deferred && r.onDelete == "NO ACTION" {
				r.onDelete = "SET NULL"
			}
			for c := range to.key {
				r.cols = append(r.cols, fmt.Sprintf("r%d_%d", j, c+1))
			}
			t.refs = append(t.refs, r)
		}
	}
	// An excluded table now and then: one nothing references and that
	// references nothing.
	if rnd.Intn(3) == 0 {
		t := &genTable{name: "scratch", key: []keyType{keyTypes[0]}, serial: true}
		t.excluded = true
		g.tables = append(g.tables, t)
		g.exclude = append(g.exclude, "public.scratch")
	}
	for _, t := range g.tables {
		var cols []string
		for i, k := range t.key {
			cols = append(cols, fmt.Sprintf("k%d %s", i+1, k.sql))
		}
		cols = append(cols, "v text", "num numeric", "doc jsonb", "tags int[]", "at timestamptz", "blob bytea")
		if t.serial {
			cols = append(cols, "ser serial")
		}
		if t.ident {
			cols = append(cols, "ident bigint GENERATED BY DEFAULT AS IDENTITY")
		}
		if t.gen {
			cols = append(cols, "g text GENERATED ALWAYS AS (v || '!') STORED")
		}
		for _, r := range t.refs {
			for c, name := range r.cols {
				cols = append(cols, name+" "+r.to.key[c].sql)
			}
		}
		cols = append(cols, "PRIMARY KEY ("+strings.Join(t.keyCols(), ", ")+")")
		kind := "TABLE"
		if t.unlogged {
			kind = "UNLOGGED TABLE"
		}
		fmt.Fprintf(&ddl, "CREATE %s %s (\n\t%s\n)", kind, t.name, strings.Join(cols, ",\n\t"))
		if t.parted {
			fmt.Fprintf(&ddl, " PARTITION BY HASH (k1);\nCREATE TABLE %[1]s_p0 PARTITION OF %[1]s FOR VALUES WITH (MODULUS 2, REMAINDER 0);\nCREATE TABLE %[1]s_p1 PARTITION OF %[1]s FOR VALUES WITH (MODULUS 2, REMAINDER 1);\n", t.name)
		} else {
			ddl.WriteString(";\n")
		}
		if t.child != "" {
			fmt.Fprintf(&ddl, "CREATE TABLE %s (extra int) INHERITS (%s);\nALTER TABLE %s ADD PRIMARY KEY (%s);\n", t.child, t.name, t.child, strings.Join(t.keyCols(), ", "))
		}
		if rnd.Intn(4) == 0 {
			fmt.Fprintf(&ddl, "ALTER TABLE %[1]s ENABLE ROW LEVEL SECURITY;\nCREATE POLICY everyone ON %[1]s USING (true);\n", t.name)
		}
		fmt.Fprintf(&seed, "INSERT INTO %s (%s, v, num, doc, tags, at, blob) SELECT %s, 'seed ' || n, n * 1.5, jsonb_build_object('n', n, 'f', n * 0.1), ARRAY[n, NULL, -n], '2024-01-01 00:00+00'::timestamptz + n * interval '1 minute', decode(md5(n::text), 'hex') FROM generate_series(0, %d) n;\n",
			t.name, strings.Join(t.keyCols(), ", "), t.keyExpr("n"), g.seedRows-1)
		if t.child != "" { // the same keys as the parent's rows: statements must keep them apart
			cols := append(t.keyCols(), "v", "extra")
			vals := []string{t.keyExpr("n"), "'child ' || n", "n"}
			if t.ident { // a child inherits the column, not its identity
				cols, vals = append(cols, "ident"), append(vals, "-n")
			}
			fmt.Fprintf(&seed, "INSERT INTO %s (%s) SELECT %s FROM generate_series(0, %d) n;\n",
				t.child, strings.Join(cols, ", "), strings.Join(vals, ", "), g.seedRows/2)
		}
	}
	for _, t := range g.tables {
		for _, r := range t.refs {
			def := ""
			if r.deferred {
				def = " DEFERRABLE INITIALLY DEFERRED"
			}
			fmt.Fprintf(&ddl, "ALTER TABLE %s ADD FOREIGN KEY (%s) REFERENCES %s ON DELETE %s ON UPDATE CASCADE%s;\n",
				t.name, strings.Join(r.cols, ", "), r.to.name, r.onDelete, def)
			// Seed: half the rows point at the row of the same number.
			fmt.Fprintf(&seed, "UPDATE ONLY %s SET (%s) = (SELECT %s) WHERE num::int %% 2 = 0;\n", t.name, strings.Join(r.cols, ", "),
				r.to.keyExpr("(num / 1.5)::int"))
		}
	}
	// Sequences in every state.
	for i := 0; i < 1+rnd.Intn(3); i++ {
		name := fmt.Sprintf("seq%d", i)
		g.sequences = append(g.sequences, name)
		fmt.Fprintf(&ddl, "CREATE SEQUENCE %s;\n", name)
		switch rnd.Intn(4) {
		case 0:
			fmt.Fprintf(&seed, "SELECT nextval('%s') FROM generate_series(1, %d);\n", name, 1+rnd.Intn(50))
		case 1:
			fmt.Fprintf(&seed, "SELECT nextval('%[1]s'); ALTER SEQUENCE %[1]s RESTART WITH %[2]d;\n", name, 100+rnd.Intn(900))
		case 2:
			fmt.Fprintf(&seed, "SELECT setval('%s', %d, false);\n", name, 10+rnd.Intn(90))
		}
	}
	g.ddl, g.seed = ddl.String(), seed.String()
	return g
}

// randomWriter runs one writer's transactions until stopped.
type randomWriter struct {
	g       *genSchema
	rnd     *rand.Rand
	next    *atomic.Int64 // row numbers for inserts, shared by the writers
	bypass  bool          // writes as another role, outside the connector: no sequence is touched
	commits atomic.Int64
	exited  atomic.Bool
	errs    []error
}

// tx returns the statements of one random transaction.
func (w *randomWriter) tx() []string {
	var out []string
	for i := 0; i < 1+w.rnd.Intn(3); i++ {
		t := w.g.tables[w.rnd.Intn(len(w.g.tables))]
		target := t.name
		only := ""
		if t.child != "" {
			switch w.rnd.Intn(3) {
			case 0:
				target = t.child
			case 1:
				only = "ONLY "
			}
		}
		m := strconv.Itoa(w.rnd.Intn(w.g.seedRows + 20))
		key := "(" + strings.Join(t.keyCols(), ", ") + ")"
		switch op := w.rnd.Intn(10); {
		case op < 3:
			n := strconv.FormatInt(w.next.Add(1), 10)
			cols := append(t.keyCols(), "v", "num", "doc", "at")
			vals := []string{t.keyExpr(n), "'ins ' || " + n, n + " * 1.5", `'{"ins": true}'`, "clock_timestamp()"}
			if w.bypass && t.serial {
				cols, vals = append(cols, "ser"), append(vals, "-"+n)
			}
			if (w.bypass || target != t.name) && t.ident {
				cols, vals = append(cols, "ident"), append(vals, "-"+n)
			}
			for _, r := range t.refs {
				if target == t.name && w.rnd.Intn(2) == 0 {
					cols = append(cols, r.cols...)
					vals = append(vals, r.to.keyExpr(strconv.Itoa(w.rnd.Intn(w.g.seedRows))))
				}
			}
			out = append(out, fmt.Sprintf("INSERT INTO %s (%s) VALUES (%s)", target, strings.Join(cols, ", "), strings.Join(vals, ", ")))
		case op < 5:
			out = append(out, fmt.Sprintf("UPDATE %s%s SET v = 'upd ' || random(), num = num + 1, tags = tags || 7 WHERE %s = (%s)", only, target, key, t.keyExpr(m)))
		case op < 6: // a large value, stored out of line
			out = append(out, fmt.Sprintf("UPDATE %s%s SET doc = jsonb_build_object('big', repeat(md5(random()::text), %d)), blob = decode(repeat(md5(random()::text), %d), 'hex') WHERE %s = (%s)",
				only, target, 100+w.rnd.Intn(3000), 100+w.rnd.Intn(3000), key, t.keyExpr(m)))
		case op < 8:
			n := strconv.FormatInt(w.next.Add(1), 10)
			out = append(out, fmt.Sprintf("UPDATE %s%s SET %s = ROW(%s) WHERE %s = (%s)", only, target, key, t.keyExpr(n), key, t.keyExpr(m)))
		default:
			out = append(out, fmt.Sprintf("DELETE FROM %s%s WHERE %s = (%s)", only, target, key, t.keyExpr(m)))
		}
	}
	if !w.bypass && len(w.g.sequences) > 0 && w.rnd.Intn(4) == 0 {
		out = append(out, fmt.Sprintf("SELECT nextval('%s')", w.g.sequences[w.rnd.Intn(len(w.g.sequences))]))
	}
	return out
}

// workloadConflict reports the errors that are the workload's own: unique
// and foreign key races between its writers, deadlocks, serialization
// failures, cycles deferred to commit.
func workloadConflict(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	switch pgErr.Code {
	case "23505", "23503", "40P01", "40001", "23502":
		return true
	}
	return false
}

// runConnector writes through the connector's *sql.DB. It stops at the
// first connection obtained after stop is set (the leader sets it once no
// application connection to the old database is left): its writes after
// that would go to the new database, after the old one was frozen.
func (w *randomWriter) runConnector(ctx context.Context, db *sql.DB, stop *atomic.Bool, done *sync.WaitGroup) {
	defer done.Done()
	defer w.exited.Store(true)
	for ctx.Err() == nil {
		conn, err := db.Conn(ctx)
		if err != nil {
			if ctx.Err() == nil {
				w.errs = append(w.errs, err)
			}
			return
		}
		if stop.Load() {
			conn.Close()
			return
		}
		err = func() error {
			tx, err := conn.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			defer tx.Rollback() //nolint:errcheck
			for _, q := range w.tx() {
				if _, err := tx.ExecContext(ctx, q); err != nil {
					return err
				}
			}
			return tx.Commit()
		}()
		conn.Close()
		switch {
		case err == nil:
			w.commits.Add(1)
		case workloadConflict(err), ctx.Err() != nil:
		default:
			w.errs = append(w.errs, err)
			return
		}
	}
}

// runBypass writes on its own connection to the old database, as another
// role, with the given session settings, until stop.
func (w *randomWriter) runBypass(ctx context.Context, url, settings string, stop *atomic.Bool, done *sync.WaitGroup) {
	defer done.Done()
	defer w.exited.Store(true)
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		w.errs = append(w.errs, err)
		return
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, settings); err != nil {
		w.errs = append(w.errs, fmt.Errorf("%s: %w", settings, err))
		return
	}
	for ctx.Err() == nil && !stop.Load() {
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			for _, q := range w.tx() {
				if _, err := tx.Exec(ctx, q); err != nil {
					return err
				}
			}
			return nil
		})
		var pgErr *pgconn.PgError
		switch {
		case err == nil:
			w.commits.Add(1)
		case workloadConflict(err), ctx.Err() != nil:
		case errors.As(err, &pgErr) && pgErr.Code == "25006": // the old database refuses writes: switched
			return
		default:
			w.errs = append(w.errs, err)
			return
		}
	}
}

// bypassSettings are session settings of writers that bypass the connector.
var bypassSettings = []string{
	"SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Kathmandu'; SET extra_float_digits = 0",
	"SET DateStyle = 'German'; SET IntervalStyle = 'sql_standard'; SET bytea_output = 'escape'; SET TimeZone = 'America/St_Johns'",
	"SET DateStyle = 'Postgres, MDY'; SET IntervalStyle = 'iso_8601'; SET extra_float_digits = -5; SET default_transaction_isolation = 'repeatable read'",
}

func runRandomSwitchover(t *testing.T, seed int64) {
	rnd := rand.New(rand.NewSource(seed))
	g := generateSchema(rnd)
	t.Logf("seed %d: %d tables, %d seed rows each, excluded %v", seed, len(g.tables), g.seedRows, g.exclude)
	old, next := fidelityPair(t, g.ddl, g.seed)
	etl := old.NewRole(t, "etl", "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO %[1]s;")
	if rnd.Intn(3) == 0 {
		pgtest.Exec(t, old.AdminURL(), "ALTER DATABASE "+old.Name+" SET default_transaction_isolation = 'repeatable read'")
	}
	var stop atomic.Bool
	var nodes []*Connector
	var dbs []*sql.DB
	for i := 0; i < 1+rnd.Intn(2); i++ {
		c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: fmt.Sprintf("node-%d", i),
			ExcludeTables: g.exclude, SyncWorkers: 1 + rnd.Intn(3), PauseBudget: 10 * time.Second})
		c.leader.testHook = func(_ context.Context, phase string) {
			if phase == "locked" {
				stop.Store(true)
			}
		}
		nodes = append(nodes, c)
		db := openDB(t, c)
		db.SetMaxOpenConns(4)
		dbs = append(dbs, db)
	}
	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	var next64 atomic.Int64
	next64.Store(1_000_000)
	var done sync.WaitGroup
	var writers []*randomWriter
	for i := 0; i < 2+rnd.Intn(3); i++ {
		w := &randomWriter{g: g, rnd: rand.New(rand.NewSource(seed*100 + int64(i))), next: &next64}
		writers = append(writers, w)
		done.Add(1)
		go w.runConnector(ctx, dbs[i%len(dbs)], &stop, &done)
	}
	for i := 0; i < 1+rnd.Intn(2); i++ {
		w := &randomWriter{g: g, rnd: rand.New(rand.NewSource(seed*100 + 50 + int64(i))), next: &next64, bypass: true}
		writers = append(writers, w)
		done.Add(1)
		go w.runBypass(ctx, etl.URL, bypassSettings[rnd.Intn(len(bypassSettings))], &stop, &done)
	}
	if rnd.Intn(4) == 0 {
		// A superuser replaying changes as logical replication does: ordinary
		// triggers (foreign keys' included) do not fire; capture's must.
		w := &randomWriter{g: g, rnd: rand.New(rand.NewSource(seed*100 + 60)), next: &next64, bypass: true}
		writers = append(writers, w)
		done.Add(1)
		go w.runBypass(ctx, old.AdminURL(), "SET session_replication_role = 'replica'", &stop, &done)
	}
	committed := func() (n int64) {
		for _, w := range writers {
			n += w.commits.Load()
		}
		return n
	}
	waitFor(t, func() bool {
		stopped := 0
		for _, w := range writers {
			if w.exited.Load() {
				stopped++
			}
		}
		return committed() > 20 || stopped == len(writers)
	})
	err := nodes[0].Reset(ctx)
	if err == nil {
		err = nodes[len(nodes)-1].Execute(ctx)
	}
	if !stop.Load() && err == nil {
		t.Error("the switch committed without the leader reaching the locked phase")
	}
	stop.Store(true)
	cancel()
	done.Wait()
	for _, w := range writers {
		for _, werr := range w.errs {
			t.Errorf("writer (bypass %v): %v", w.bypass, werr)
		}
	}
	if err != nil {
		t.Fatalf("switchover: %v", err)
	}
	t.Logf("%d transactions committed by %d writers", committed(), len(writers))
	var skipSeq []string
	for _, tbl := range g.tables {
		if tbl.excluded {
			skipSeq = append(skipSeq, "public."+tbl.name+"_ser_seq")
		}
	}
	pgtest.AssertSame(t, old, next, pgtest.CompareOptions{SkipTables: g.exclude, SkipSequences: skipSeq})
	verifyEqual(t, nodes[0])
}

// TestRandomSwitchovers runs whole switchovers of generated schemas under
// generated concurrent workloads, each checked by the independent checker.
func TestRandomSwitchovers(t *testing.T) {
	seeds := []int64{1, 2, 3}
	if s := os.Getenv("SWO_RANDOM_SEED"); s != "" {
		seed, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("SWO_RANDOM_SEED=%q: %v", s, err)
		}
		seeds = []int64{seed}
	} else if s := os.Getenv("SWO_RANDOM_RUNS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("SWO_RANDOM_RUNS=%q: %v", s, err)
		}
		base := time.Now().UnixNano() % 1_000_000_000
		seeds = seeds[:0]
		for i := 0; i < n; i++ {
			seeds = append(seeds, base+int64(i))
		}
	}
	failed := 0
	for _, seed := range seeds {
		ok := t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			defer func() {
				if t.Failed() {
					t.Logf("replay: SWO_RANDOM_SEED=%d go test -run TestRandomSwitchovers .", seed)
				}
			}()
			runRandomSwitchover(t, seed)
		})
		if !ok {
			failed++
		}
	}
	t.Logf("%d runs, %d failed", len(seeds), failed)
}
