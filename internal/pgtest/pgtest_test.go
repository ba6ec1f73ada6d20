package pgtest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func TestMain(m *testing.M) { Main(m) }

func TestNewDatabaseIsFreshAndFast(t *testing.T) {
	srv := Shared(t)
	start := time.Now()
	const n = 5
	var names []string
	for i := 0; i < n; i++ {
		d := srv.NewDatabase(t)
		names = append(names, d.Name)
		c := Connect(t, d.URL)
		var tables int
		if err := c.QueryRow(context.Background(), "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog','information_schema')").Scan(&tables); err != nil {
			t.Fatal(err)
		}
		if tables != 0 {
			t.Fatalf("database %s is not empty: %d tables", d.Name, tables)
		}
	}
	t.Logf("backend %s: %d databases created and connected in %v (%v each)", srv.Backend(), n, time.Since(start), time.Since(start)/n)
	if names[0] == names[1] {
		t.Fatal("database names repeat")
	}
}

func TestOwnerRoleIsNotSuperuserAndOwnsPublic(t *testing.T) {
	d := NewDatabase(t, Owner("app"))
	c := Connect(t, d.URL)
	var super bool
	if err := c.QueryRow(context.Background(), "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&super); err != nil {
		t.Fatal(err)
	}
	if super {
		t.Fatal("owner role is a superuser")
	}
	if _, err := c.Exec(context.Background(), "CREATE TABLE public.t (id int primary key)"); err != nil {
		t.Fatalf("owner cannot create a table in public: %v", err)
	}
	if !strings.Contains(d.URL, d.Password) {
		t.Fatal("URL does not carry the owner's password")
	}
}

func TestOwnServerStopKillRestart(t *testing.T) {
	srv := NewServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d := srv.NewDatabase(t)
	Exec(t, d.URL, "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)")

	c, err := pgx.Connect(ctx, d.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	if err := srv.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx); err == nil {
		t.Fatal("connection survived a killed server")
	}
	if _, err := pgx.Connect(ctx, d.URL); err == nil {
		t.Fatal("connected to a killed server")
	}
	if err := srv.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	c2 := Connect(t, d.URL)
	var n int
	if err := c2.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil || n != 1 {
		t.Fatalf("after crash recovery: n=%d err=%v", n, err)
	}
	if err := srv.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c2.Ping(ctx); err == nil {
		t.Fatal("connection survived a stopped server")
	}
	if err := srv.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	Exec(t, d.URL, "INSERT INTO t VALUES (2)")
}

// TestCompareFindsEachDifference: the independent checker must see every
// kind of difference it claims to compare, including rows hidden by a
// policy, in a child table, and in sequences that were never called.
func TestCompareFindsEachDifference(t *testing.T) {
	ctx := context.Background()
	ddl := `
CREATE TABLE t (id int PRIMARY KEY, v text, f float8);
ALTER TABLE t ENABLE ROW LEVEL SECURITY; ALTER TABLE t FORCE ROW LEVEL SECURITY;
CREATE POLICY hide ON t USING (false);
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE kid () INHERITS (parent);
CREATE SEQUENCE s;
CREATE MATERIALIZED VIEW m AS SELECT 1 AS one;
CREATE TABLE parted (k int) PARTITION BY RANGE (k);
CREATE TABLE parted_a PARTITION OF parted FOR VALUES FROM (0) TO (10);`
	seed := `INSERT INTO t VALUES (1, 'a', 0.1), (2, 'b', 0.30000000000000004); INSERT INTO kid VALUES (7);
SELECT lo_from_bytea(424242, 'large');`
	a, b := NewDatabase(t), NewDatabase(t)
	Exec(t, a.URL, ddl+seed)
	Exec(t, b.URL, ddl+seed)
	diffs, err := Compare(ctx, a.AdminURL(), b.AdminURL(), CompareOptions{})
	if err != nil || len(diffs) != 0 {
		t.Fatalf("identical databases: %v, %v", diffs, err)
	}
	for _, tc := range []struct {
		change, want string
	}{
		{"UPDATE t SET f = 0.3 WHERE id = 2", "table public.t: 2 rows in the old database, 2 in the new; 1 rows only in the old, 1 only in the new"},
		{"DELETE FROM kid", "table public.kid: 1 rows in the old database, 0 in the new"},
		{"SELECT setval('s', 1, false)", "sequence public.s: next value 1 in the old database, next value 2 in the new"},
		{"ALTER TABLE t NO FORCE ROW LEVEL SECURITY", "table public.t: rls true forced true policies hide * true {-} false  in the old database, rls true forced false"},
		{"ALTER POLICY hide ON t USING (id > 0)", "policies hide * true {-} (id > 0)"},
		{"CREATE TABLE information_schema.sneaky (id int)", "table information_schema.sneaky: only in the new database"},
		{"SELECT lo_unlink(424242); SELECT lo_from_bytea(424242, 'LARGE')", "large object 424242"},
		{"REFRESH MATERIALIZED VIEW m WITH NO DATA", "materialized view public.m: populated true in the old database, false"},
		{"ALTER TABLE parted DETACH PARTITION parted_a", `relation of public.parted_a: "inherits public.parted FOR VALUES FROM (0) TO (10)" in the old database, "" in the new`},
		{"ALTER TABLE t ADD COLUMN extra int", "table public.t: columns (f, id, v) in the old database, (extra, f, id, v) in the new one"},
	} {
		b := NewDatabase(t)
		Exec(t, b.URL, ddl+seed)
		Exec(t, b.AdminURL(), tc.change)
		if tc.change == "SELECT setval('s', 1, false)" { // the old side: never called; the new: called once
			Exec(t, b.AdminURL(), "SELECT nextval('s')")
		}
		diffs, err := Compare(ctx, a.AdminURL(), b.AdminURL(), CompareOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(diffs) != 1 || !strings.Contains(diffs[0], tc.want) {
			t.Errorf("after %q: %d differences %q, want one containing %q", tc.change, len(diffs), diffs, tc.want)
		}
	}
}
