package swo

import (
	"errors"
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
