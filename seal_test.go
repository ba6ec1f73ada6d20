package swo

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/pgswo/swo/internal/pgtest"
)

// TestSealRemovedAfterATableGotAParentDuringTheRun: a sealed partitioned
// table becomes a partition during the run (ATTACH under a new partitioned
// table): the run fails, and RESET (which refuses the new shape) still
// removes capture and the seal, the table's own trigger included (found by
// review: it was skipped as a clone, and every RESET then failed on the
// seal function's dependency).
func TestSealRemovedAfterATableGotAParentDuringTheRun(t *testing.T) {
	old, next := fidelityPair(t, `CREATE TABLE m (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10);`, "INSERT INTO m VALUES (1, 1);")
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	atPhase(c, "initial copy", func(ctx context.Context) {
		// A partition reorganisation during the run (unsupported DDL: the run
		// may fail, but RESET must clean up).
		pgtest.Exec(t, old.URL, `CREATE TABLE top (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
ALTER TABLE top ATTACH PARTITION m FOR VALUES FROM (0) TO (100);`)
	})
	err := switchover(t, c)
	if !errors.Is(err, ErrRunFailed) {
		t.Fatalf("RESET + EXECUTE: %v, want the run to fail", err)
	}
	if err := c.Reset(testCtx(t)); !errors.Is(err, ErrPreconditions) || !strings.Contains(err.Error(), "public.top") {
		t.Errorf("RESET after the failed run: %v, want it to refuse the new shape, naming public.top", err)
	}
	var leftover int
	var changes *string
	if err := pgtest.Connect(t, old.URL).QueryRow(testCtx(t),
		"SELECT (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'swo%'), to_regclass('swo.changes')::text").Scan(&leftover, &changes); err != nil {
		t.Fatal(err)
	}
	if leftover != 0 || changes != nil {
		t.Errorf("left on the old database after RESET: %d swo trigger(s), change table %v", leftover, changes)
	}
}
