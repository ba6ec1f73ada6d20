package swo

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/pgswo/swo/internal/pgtest"
)

// TestCheckIsADryRun: Check lists every problem RESET would find (a table
// without a key, a missing column, a target holding other rows) and changes
// neither database: no library schema, no trigger, the target's rows as
// they were. Once the problems are fixed it returns nil, still changing
// nothing.
func TestCheckIsADryRun(t *testing.T) {
	old, next := pgtest.NewDatabase(t), pgtest.NewDatabase(t)
	pgtest.Exec(t, old.URL, `CREATE TABLE nokey (v int); CREATE TABLE cols (id int PRIMARY KEY, a int, b text);
CREATE TABLE filled (id int PRIMARY KEY); INSERT INTO filled VALUES (1), (2)`)
	pgtest.Exec(t, next.URL, `CREATE TABLE nokey (v int); CREATE TABLE cols (id int PRIMARY KEY, a int);
CREATE TABLE filled (id int PRIMARY KEY); INSERT INTO filled VALUES (7)`)
	ctx := testCtx(t)
	cfg := Config{OldURL: old.URL, NextURL: next.URL, Logger: testLogger(t)}
	untouched := func() {
		t.Helper()
		for _, d := range []*pgtest.Database{old, next} {
			var schemas, triggers int
			err := pgtest.Connect(t, d.URL).QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'swo'),
				(SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal)`).Scan(&schemas, &triggers)
			if err != nil || schemas != 0 || triggers != 0 {
				t.Fatalf("%s changed by Check: %d swo schemas, %d triggers, %v", d.Name, schemas, triggers, err)
			}
		}
		var ids string
		if err := pgtest.Connect(t, next.URL).QueryRow(ctx, "SELECT string_agg(id::text, ',') FROM filled").Scan(&ids); err != nil || ids != "7" {
			t.Fatalf("the new database's rows changed: %q, %v", ids, err)
		}
	}
	err := Check(ctx, cfg)
	var pe *PreconditionError
	if !errors.Is(err, ErrPreconditions) || !errors.As(err, &pe) {
		t.Fatalf("Check: %v", err)
	}
	for obj, issue := range map[string]string{"public.nokey": "no primary key", "public.cols.b": "column missing"} {
		found := false
		for _, p := range pe.Problems {
			found = found || (p.Object == obj && strings.Contains(p.Issue, issue))
		}
		if !found {
			t.Errorf("no problem %q on %s in:\n%v", issue, obj, err)
		}
	}
	untouched()

	pgtest.Exec(t, old.URL, "ALTER TABLE nokey ADD PRIMARY KEY (v)")
	pgtest.Exec(t, next.URL, "ALTER TABLE nokey ADD PRIMARY KEY (v); ALTER TABLE cols ADD COLUMN b text; DELETE FROM filled; INSERT INTO filled VALUES (7)")
	// With the schemas fixed, the new database's own rows are the problem.
	if err := Check(ctx, cfg); !errors.As(err, &pe) || len(pe.Problems) != 1 || pe.Problems[0].Object != "new database" ||
		!strings.Contains(pe.Problems[0].Issue, "public.filled") || !strings.Contains(pe.Problems[0].Issue, "AllowClearTarget") {
		t.Fatalf("Check with a filled target: %v", err)
	}
	untouched()
	cfg.AllowClearTarget = true
	if err := Check(ctx, cfg); err != nil {
		t.Fatalf("Check once fixed: %v", err)
	}
	untouched()

	// Configuration mistakes are errors of their own, naming the field.
	if err := Check(ctx, Config{OldURL: old.URL}); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "NextURL") {
		t.Fatalf("Check without NextURL: %v", err)
	}
	if err := Check(ctx, Config{OldURL: old.URL, NextURL: old.URL}); !errors.Is(err, ErrPreconditions) || !strings.Contains(err.Error(), "reach the same database") {
		t.Fatalf("Check with one database twice: %v", err)
	}
}

// TestCheckAcceptsASchemaCreatedForTheRole: the documented alternative to
// GRANT CREATE ON DATABASE, an administrator's CREATE SCHEMA swo
// AUTHORIZATION <role>, satisfies Check and NewConnector (found by review:
// both still asked for CREATE on the database).
func TestCheckAcceptsASchemaCreatedForTheRole(t *testing.T) {
	old, next := pgtest.NewDatabase(t), pgtest.NewDatabase(t)
	ctx := testCtx(t)
	var urls []string
	for _, d := range []*pgtest.Database{old, next} {
		r := d.NewRole(t, "app", "CREATE SCHEMA swo AUTHORIZATION %[1]s; CREATE TABLE public.t (id int PRIMARY KEY); ALTER TABLE public.t OWNER TO %[1]s;")
		urls = append(urls, r.URL)
	}
	cfg := Config{OldURL: urls[0], NextURL: urls[1], Logger: testLogger(t)}
	if err := Check(ctx, cfg); err != nil {
		t.Fatalf("Check: %v", err)
	}
	c, err := NewConnector(ctx, cfg)
	if err != nil {
		t.Fatalf("NewConnector: %v", err)
	}
	c.Close()
	// Without either privilege, Check names the role and both remedies.
	bare := old.NewRole(t, "bare", "COMMENT ON ROLE %[1]s IS 'no CREATE anywhere';")
	err = Check(ctx, Config{OldURL: bare.URL, NextURL: urls[1], Namespace: "other", Logger: testLogger(t)})
	want := fmt.Sprintf(`old database: role %q may not create swo's schema "other": have an administrator run GRANT CREATE ON DATABASE %q TO %q, or CREATE SCHEMA other AUTHORIZATION %q`,
		bare.Name, old.Name, bare.Name, bare.Name)
	if !errors.Is(err, ErrPreconditions) || !strings.Contains(err.Error(), want) {
		t.Fatalf("Check without the privilege: %v\nwant it to say: %s", err, want)
	}
}

// TestCheckRefusesAForeignNamespace: a schema of the service's own named
// like the library's is a problem Check reports, as NewConnector refuses it
// (found by review: Check passed, and would have left its tables out).
func TestCheckRefusesAForeignNamespace(t *testing.T) {
	old, next := pgtest.NewDatabase(t), pgtest.NewDatabase(t)
	pgtest.Exec(t, old.URL, "CREATE SCHEMA swo; CREATE TABLE swo.accounts (id int PRIMARY KEY); CREATE TABLE t (id int PRIMARY KEY)")
	pgtest.Exec(t, next.URL, "CREATE TABLE t (id int PRIMARY KEY)")
	err := Check(testCtx(t), Config{OldURL: old.URL, NextURL: next.URL, Logger: testLogger(t)})
	if !errors.Is(err, ErrPreconditions) || !strings.Contains(err.Error(), `schema "swo" exists and was not created by swo; choose another Config.Namespace`) {
		t.Fatalf("Check: %v", err)
	}
}

// TestCheckDuringARunAndAgainstTheNodes: while a run is in progress Check
// says so rather than comparing the new database as the run left it (found
// by review: it reported the keys dropped for the load); and its settings
// must be the nodes', or it says what differs.
func TestCheckDuringARunAndAgainstTheNodes(t *testing.T) {
	old, next := fidelityPair(t, "CREATE TABLE t (id int PRIMARY KEY, v int); CREATE TABLE scratch (id int PRIMARY KEY);",
		"INSERT INTO t SELECT i, i FROM generate_series(1, 100) i;")
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, ExcludeTables: []string{"public.scratch"}})
	ctx := testCtx(t)
	if err := c.Reset(ctx); err != nil {
		t.Fatal(err)
	}
	err := Check(ctx, Config{OldURL: old.URL, NextURL: next.URL, Logger: testLogger(t)})
	if !errors.Is(err, ErrPreconditions) || !strings.Contains(err.Error(), "differ from node") || !strings.Contains(err.Error(), "public.scratch") {
		t.Fatalf("Check with other settings than the node's: %v", err)
	}
	same := Config{OldURL: old.URL, NextURL: next.URL, ExcludeTables: []string{"public.scratch"}, Logger: testLogger(t)}
	if err := Check(ctx, same); err != nil {
		t.Fatalf("Check with the node's settings: %v", err)
	}
	checked := make(chan error, 1)
	atPhase(c, "initial copy", func(ctx context.Context) { checked <- Check(ctx, same) })
	if err := c.Execute(ctx); err != nil {
		t.Fatal(err)
	}
	err = <-checked
	if !errors.Is(err, ErrPreconditions) || !strings.Contains(err.Error(), "a run is in progress (state syncing)") || strings.Contains(err.Error(), "primary key") {
		t.Fatalf("Check during the run: %v", err)
	}
}

// TestCheckOnAFormerNewDatabase: B of an A → B move holds swo's schema
// without the cluster's tables; Check of B → C works (found by review: it
// failed on the missing node table).
func TestCheckOnAFormerNewDatabase(t *testing.T) {
	a, b, c := pgtest.NewDatabase(t), pgtest.NewDatabase(t), pgtest.NewDatabase(t)
	for _, d := range []*pgtest.Database{a, b, c} {
		pgtest.Exec(t, d.URL, "CREATE TABLE t (id int PRIMARY KEY)")
	}
	newConnector(t, Config{OldURL: a.URL, NextURL: b.URL}).Close() // gives B its swo schema
	if err := Check(testCtx(t), Config{OldURL: b.URL, NextURL: c.URL, Logger: testLogger(t)}); err != nil {
		t.Fatalf("Check of B → C: %v", err)
	}
}

// TestNormalModeIgnoresAnApplicationSchemaNamedLikeTheNamespace: in normal
// mode the library creates nothing, so the application's own schema named
// "swo" is no concern (found by review: NewConnector refused it).
func TestNormalModeIgnoresAnApplicationSchemaNamedLikeTheNamespace(t *testing.T) {
	db := pgtest.NewDatabase(t)
	pgtest.Exec(t, db.URL, "CREATE SCHEMA swo; CREATE TABLE swo.orders (id int PRIMARY KEY)")
	c := newConnector(t, Config{OldURL: db.URL})
	var n int
	if err := openDB(t, c).QueryRowContext(testCtx(t), "SELECT count(*) FROM swo.orders").Scan(&n); err != nil {
		t.Fatal(err)
	}
}
