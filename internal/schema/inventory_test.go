package schema

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/pgswo/swo/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// everyKind creates one object of every kind in Kinds (as a superuser).
const everyKind = `
CREATE SCHEMA app;
CREATE TABLE app.t (id int PRIMARY KEY, v text DEFAULT 'x');
CREATE UNLOGGED TABLE app.u (id int PRIMARY KEY);
CREATE TABLE app.p (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
CREATE TABLE app.p1 PARTITION OF app.p FOR VALUES FROM (0) TO (10);
CREATE TABLE app.child () INHERITS (app.t);
CREATE SEQUENCE app.s;
CREATE UNLOGGED SEQUENCE app.us;
CREATE VIEW app.v AS SELECT * FROM app.t;
CREATE MATERIALIZED VIEW app.m AS SELECT * FROM app.t;
CREATE TYPE app.comp AS (a int);
CREATE TYPE app.mood AS ENUM ('a');
CREATE DOMAIN app.d AS int;
CREATE TYPE app.r AS RANGE (subtype = float8);
CREATE FUNCTION app.f() RETURNS int LANGUAGE sql AS 'SELECT 1';
CREATE PROCEDURE app.pr() LANGUAGE sql AS 'SELECT 1';
CREATE AGGREGATE app.agg(int) (sfunc = int4pl, stype = int);
CREATE OPERATOR app.=== (leftarg = int, rightarg = int, function = int4eq);
CREATE OPERATOR FAMILY app.fam USING btree;
CREATE OPERATOR CLASS app.int4_ops2 FOR TYPE int4 USING btree FAMILY app.fam AS
	OPERATOR 1 <, OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >, FUNCTION 1 btint4cmp(int4, int4);
CREATE CAST (app.comp AS int) WITH INOUT;
CREATE COLLATION app.coll FROM "C";
CREATE CONVERSION app.conv FOR 'LATIN1' TO 'UTF8' FROM iso8859_1_to_utf8;
CREATE TEXT SEARCH CONFIGURATION app.tsc (COPY = english);
CREATE TEXT SEARCH DICTIONARY app.tsd (TEMPLATE = simple);
CREATE TEXT SEARCH TEMPLATE app.tst (LEXIZE = dsimple_lexize, INIT = dsimple_init);
CREATE TEXT SEARCH PARSER app.tsp (START = prsd_start, GETTOKEN = prsd_nexttoken, END = prsd_end, LEXTYPES = prsd_lextype);
CREATE STATISTICS app.st ON id, v FROM app.t;
CREATE ACCESS METHOD heap2 TYPE TABLE HANDLER heap_tableam_handler;
CREATE LANGUAGE plpgsql2 HANDLER plpgsql_call_handler;
CREATE TRANSFORM FOR int4 LANGUAGE plpgsql2 (FROM SQL WITH FUNCTION varchar_support(internal), TO SQL WITH FUNCTION int4recv(internal));
CREATE FUNCTION app.tf() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER tr BEFORE INSERT ON app.t FOR EACH ROW EXECUTE FUNCTION app.tf();
CREATE RULE keep_u AS ON DELETE TO app.u DO ALSO NOTHING;
CREATE POLICY pol ON app.t USING (true);
CREATE EXTENSION hstore;
CREATE EXTENSION file_fdw;
CREATE SERVER srv FOREIGN DATA WRAPPER file_fdw;
CREATE USER MAPPING FOR CURRENT_USER SERVER srv;
CREATE FOREIGN TABLE app.ft (a int) SERVER srv OPTIONS (filename '/dev/null');
ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO PUBLIC;
CREATE PUBLICATION pub FOR TABLE app.t;
CREATE PUBLICATION pub2 FOR TABLES IN SCHEMA app;
CREATE SUBSCRIPTION sub CONNECTION 'host=/nonexistent dbname=x' PUBLICATION pub WITH (connect = false);
SELECT lo_from_bytea(0, 'x');
SELECT lo_from_bytea(4242, 'a low oid, as its creator asked');
COMMENT ON TABLE app.t IS 'c';
CREATE TABLE information_schema.sneaky (id int PRIMARY KEY);
-- An extension's configuration table holding a row of the user's, and a
-- configuration sequence (as pg_extension_config_dump would record them from
-- an extension's script), and a table of the extension's own.
CREATE TABLE app.cfg (id int PRIMARY KEY);
INSERT INTO app.cfg VALUES (1);
ALTER EXTENSION hstore ADD TABLE app.cfg;
CREATE SEQUENCE app.cfgseq;
ALTER EXTENSION hstore ADD SEQUENCE app.cfgseq;
UPDATE pg_extension SET extconfig = ARRAY['app.cfg'::regclass::oid, 'app.cfgseq'::regclass::oid], extcondition = ARRAY['', ''] WHERE extname = 'hstore';
CREATE TABLE app.extown (id int);
ALTER EXTENSION file_fdw ADD TABLE app.extown;
CREATE SCHEMA swo;
CREATE TABLE swo.meta (a int);
CREATE FUNCTION app.etf() RETURNS event_trigger LANGUAGE plpgsql AS $$BEGIN END$$;
CREATE EVENT TRIGGER et ON ddl_command_end EXECUTE FUNCTION app.etf();
`

// TestInventoryClassifiesEveryKind walks a database that holds one object of
// every kind: nothing may be unclassified, every classified kind must be
// found (so that the test keeps covering Kinds), and the refused kinds must
// come out as precondition problems naming their objects.
func TestInventoryClassifiesEveryKind(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv := pgtest.Shared(t)
	if !allowsPreparedAndSlots(t, srv) {
		srv = pgtest.NewServer(t) // the harness's own servers allow them
	}
	d := srv.NewDatabase(t)
	pgtest.Exec(t, d.AdminURL(), everyKind+"ALTER DATABASE "+d.Name+" SET work_mem = '8MB';")
	// A temporary table lives as long as its session; a prepared transaction
	// until it is finished (before the database is dropped).
	tmp := pgtest.Connect(t, d.AdminURL())
	if _, err := tmp.Exec(ctx, "CREATE TEMP TABLE scratch (a int)"); err != nil {
		t.Fatal(err)
	}
	// A logical slot waits for open transactions when it is created: first.
	slot := pgtest.RandomName("cdc_")
	pgtest.Exec(t, d.AdminURL(), "SELECT pg_create_logical_replication_slot('"+slot+"', 'pgoutput')")
	t.Cleanup(func() { pgtest.Exec(t, d.AdminURL(), "SELECT pg_drop_replication_slot('"+slot+"')") })
	pgtest.Exec(t, d.AdminURL(), "BEGIN; INSERT INTO app.t VALUES (99); PREPARE TRANSACTION 'pending_job'")
	t.Cleanup(func() { pgtest.Exec(t, d.AdminURL(), "ROLLBACK PREPARED 'pending_job'") })

	db, err := Read(ctx, pgtest.Connect(t, d.AdminURL()), Options{LibrarySchema: "swo"})
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]Found{}
	for _, f := range db.Inventory {
		found[f.Key] = f
		if f.Kind == nil {
			t.Errorf("unclassified: %s (%d objects: %v)", f.Key, f.Count, f.Names)
		}
	}
	for _, k := range Kinds {
		if _, ok := found[k.Key]; !ok {
			t.Errorf("kind %s (%s) not found: the test database must hold one of every kind", k.Key, k.Name)
		}
	}
	want := map[string][]string{
		"pg_class:extension-config": {"app.cfg"},
		"pg_class:extension":        {"app.extown"},
		"pg_class:library":          {"swo.meta"},
		"pg_class:temporary":        {".scratch"},
		"pg_rewrite:rule":           {"app.u keep_u"},
		"pg_subscription":           {"sub"},
	}
	for key, names := range want {
		for _, n := range names {
			if !strings.Contains(strings.Join(found[key].Names, "|"), n) {
				t.Errorf("%s: %v does not name %s", key, found[key].Names, n)
			}
		}
	}
	problems := db.inventoryProblems(nil)
	text := problems.Error()
	for _, want := range []string{
		"large objects: 2 in the old database",
		"subscription sub: it would keep writing into the old database",
		"prepared transaction pending_job (owner",
		"app.cfg: an extension's configuration table holding rows of yours",
		"information_schema.sneaky: a superuser's table in pg_catalog or information_schema",
		"logical replication slot",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("problems do not say %q:\n%s", want, text)
		}
	}
	if len(problems) != 6 {
		t.Errorf("%d problems, want 6:\n%s", len(problems), text)
	}
	if text := db.inventoryProblems([]string{"app.cfg"}).Error(); strings.Contains(text, "app.cfg") {
		t.Errorf("an excluded configuration table is still refused:\n%s", text)
	}
}

func allowsPreparedAndSlots(t *testing.T, srv *pgtest.Server) bool {
	conn, err := srv.Admin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var ok bool
	if err := conn.QueryRow(context.Background(), "SELECT current_setting('max_prepared_transactions')::int > 0 AND current_setting('wal_level') = 'logical'").Scan(&ok); err != nil {
		t.Fatal(err)
	}
	return ok
}

// TestUnknownKindsAreRefused: a kind the classification does not know (a
// catalog of a newer PostgreSQL, say) is a precondition problem.
func TestUnknownKindsAreRefused(t *testing.T) {
	t.Parallel()
	db := &Database{Inventory: []Found{
		{Key: "pg_class:r", Count: 3, Kind: KindOf("pg_class:r")},
		{Key: "pg_class:x", Count: 2, Names: []string{"public.odd", "public.odder"}},
		{Key: "pg_newcatalog", Count: -1},
	}}
	ps := db.inventoryProblems(nil)
	if len(ps) != 2 || !strings.Contains(ps[0].String(), "catalog pg_class:x: the old database holds 2 object(s) of a kind swo does not know (public.odd, public.odder)") ||
		!strings.Contains(ps[1].String(), "catalog pg_newcatalog: the old database holds an unknown number of object(s)") {
		t.Fatalf("problems: %v", ps)
	}
}

var update = flag.Bool("update", false, "rewrite docs/inventory.md's table from Kinds")

// TestInventoryTableInDocs keeps the documented inventory table equal to
// Kinds.
func TestInventoryTableInDocs(t *testing.T) {
	t.Parallel()
	const path = "../../docs/inventory.md"
	const begin, end = "<!-- inventory table: generated from internal/schema.Kinds -->\n", "<!-- end of inventory table -->\n"
	doc, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := string(doc)
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		t.Fatalf("%s: markers %q and %q not found", path, begin, end)
	}
	fresh := s[:i+len(begin)] + InventoryTable() + s[j:]
	if fresh == s {
		return
	}
	if *update {
		if err := os.WriteFile(path, []byte(fresh), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("%s is out of date with Kinds: go test ./internal/schema -run TestInventoryTableInDocs -update", path)
}

// TestSequenceMovedWith: a sequence moves unless every table that owns or
// uses it is excluded.
func TestSequenceMovedWith(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		seq     Sequence
		exclude []string
		moved   bool
	}{
		{Sequence{Name: "free"}, []string{"*"}, true},
		{Sequence{Owner: TableRef{"public", "parted"}}, nil, true},
		{Sequence{Owner: TableRef{"public", "scratch"}}, []string{"public.scratch"}, false},
		{Sequence{Owner: TableRef{"public", "scratch"}, UsedBy: []TableRef{{"public", "borrower"}}}, []string{"public.scratch"}, true},
		{Sequence{Owner: TableRef{"public", "scratch"}, UsedBy: []TableRef{{"public", "scratch"}}}, []string{"scratch"}, false},
		{Sequence{UsedBy: []TableRef{{"etl", "load"}}}, []string{"etl.*"}, false},
		{Sequence{Owner: TableRef{"public", "t.x"}}, []string{"public.t"}, true},
		{Sequence{Owner: TableRef{"a.b", "c"}}, []string{`"a.b".c`}, false},
		{Sequence{Owner: TableRef{"a", "b.c"}}, []string{`"a.b".c`}, true},
		{Sequence{Owner: TableRef{"a", "b.c"}}, []string{`a."b.c"`}, false},
	} {
		if got := tc.seq.movedWith(tc.exclude); got != tc.moved {
			t.Errorf("%+v excluding %v: moved %v, want %v", tc.seq, tc.exclude, got, tc.moved)
		}
	}
}

// TestNamesAreUnambiguous: names that need quoting are quoted, so that
// different relations never render alike; patterns parse them back.
func TestNamesAreUnambiguous(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ schema, name, want string }{
		{"public", "orders", "public.orders"},
		{"a.b", "c", `"a.b".c`},
		{"a", "b.c", `a."b.c"`},
		{"App", "Say \"hi\"", `"App"."Say ""hi"""`},
	} {
		if got := Name(tc.schema, tc.name); got != tc.want {
			t.Errorf("Name(%q, %q) = %s, want %s", tc.schema, tc.name, got, tc.want)
		}
		if s, n := SplitPattern(tc.want); s != tc.schema || n != tc.name {
			t.Errorf("SplitPattern(%s) = %q, %q; want %q, %q", tc.want, s, n, tc.schema, tc.name)
		}
	}
	if s, n := SplitPattern("orders"); s != "*" || n != "orders" {
		t.Errorf("a bare name: %q, %q", s, n)
	}
}

// TestRowLevelSecurityRule: which roles row level security would filter.
func TestRowLevelSecurityRule(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		role          Role
		owner, rls    bool
		force, filter bool
	}{
		{Role{}, true, false, false, false},
		{Role{}, true, true, false, false},
		{Role{}, true, true, true, true},
		{Role{}, false, true, false, true},
		{Role{BypassRLS: true}, false, true, true, false},
		{Role{Superuser: true}, true, true, true, false},
		{Role{}, false, false, true, false},
	} {
		db := &Database{Role: tc.role}
		tbl := &Table{IsOwner: tc.owner, RowSecurity: tc.rls, ForceRowSecurity: tc.force}
		if got := db.subjectToRLS(tbl); got != tc.filter {
			t.Errorf("%+v owner=%v rls=%v force=%v: filtered %v, want %v", tc.role, tc.owner, tc.rls, tc.force, got, tc.filter)
		}
	}
}

// TestKeyTextStability: whether a key's text form depends on session
// settings, decided by type through domains, arrays, ranges and composites.
func TestKeyTextStability(t *testing.T) {
	d := pgtest.NewDatabase(t)
	pgtest.Exec(t, d.URL, `
CREATE DOMAIN day AS date; CREATE DOMAIN code AS text; CREATE TYPE pair AS (a int, b text); CREATE TYPE fpair AS (a int, b float8);
CREATE TYPE mood AS ENUM ('a'); CREATE TYPE frange AS RANGE (subtype = float8);
CREATE TABLE k (
	i int, t text, u uuid, n numeric, e mood, c code, p pair, ai int[], ir int4range, b bool, ch char(3), vc varchar(9), j jsonb,
	ts timestamp(3), tz timestamptz, d day, f4 real, f8 float8, iv interval, by bytea, m money, fp fpair, ar float8[],
	dr daterange, fr frange, pt point, rc regclass, tm time, mr datemultirange)`)
	db, err := Read(context.Background(), pgtest.Connect(t, d.URL), Options{LibrarySchema: "swo"})
	if err != nil {
		t.Fatal(err)
	}
	stable := map[string]bool{}
	for _, c := range db.Table("public.k").Columns {
		stable[c.Name] = c.TextStable
	}
	for _, name := range []string{"i", "t", "u", "n", "e", "c", "p", "ai", "ir", "b", "ch", "vc", "j"} {
		if !stable[name] {
			t.Errorf("column %s: text form judged to depend on settings", name)
		}
	}
	for _, name := range []string{"ts", "tz", "d", "f4", "f8", "iv", "by", "m", "fp", "ar", "dr", "fr", "pt", "rc", "tm", "mr"} {
		if stable[name] {
			t.Errorf("column %s: text form judged independent of settings", name)
		}
	}
}

// TestSizesOfATableNeverAnalysed: a table loaded just before the run (no
// VACUUM or ANALYZE yet) has pages to split the copy by and a row estimate
// for progress (relpages and reltuples say 0 and -1 until then).
func TestSizesOfATableNeverAnalysed(t *testing.T) {
	d := pgtest.NewDatabase(t)
	const n = 100000
	pgtest.Exec(t, d.URL, fmt.Sprintf(`CREATE TABLE fresh (id bigint PRIMARY KEY, title text, done boolean) WITH (autovacuum_enabled = off);
INSERT INTO fresh SELECT i, 'item ' || i, false FROM generate_series(1, %d) i`, n))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db, err := Read(ctx, pgtest.Connect(t, d.AdminURL()), Options{LibrarySchema: "swo"})
	if err != nil {
		t.Fatal(err)
	}
	tb := db.Table("public.fresh")
	if tb.Pages < 500 || tb.RowsEstimate < n/3 || tb.RowsEstimate > 3*n {
		t.Fatalf("pages %d, rows estimate %d for %d rows never analysed", tb.Pages, tb.RowsEstimate, n)
	}
}
