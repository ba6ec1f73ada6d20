package main

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/pgswo/swo"
	"github.com/pgswo/swo/internal/pgtest"
)

// Instances that start at once migrate the database once between them, and
// a migrated database stays as it is.
func TestMigrateConcurrentAndIdempotent(t *testing.T) {
	db := pgtest.NewDatabase(t, pgtest.Owner("todo"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	applied := make([]int, 3)
	errs := make([]error, 3)
	for i := range applied {
		wg.Go(func() { applied[i], errs[i] = migrateURL(ctx, db.URL) })
	}
	wg.Wait()
	total := 0
	for i := range applied {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		total += applied[i]
	}
	if want := len(migrations) - 1; total != want {
		t.Errorf("three concurrent migrations applied %d migrations in all, want %d", total, want)
	}
	if n, err := migrateURL(ctx, db.URL); err != nil || n != 0 {
		t.Errorf("migrating a migrated database applied %d (err %v), want 0", n, err)
	}
}

// Every error the library returns to Reset and Execute has a hint, found
// through the error chain and, for Status.LastError, through its text.
func TestHints(t *testing.T) {
	for _, h := range hints {
		err := fmt.Errorf("swo: reset failed: %w: details", h.err)
		if got := AdminHint(err); got != h.hint {
			t.Errorf("AdminHint(%v) = %q, want %q", err, got, h.hint)
		}
		if got := lastErrorHint(err.Error()); got != h.hint {
			t.Errorf("lastErrorHint(%q) = %q, want %q", err, got, h.hint)
		}
	}
	wrapped := fmt.Errorf("%w: %w", swo.ErrRunFailed, swo.ErrPauseBudget)
	if AdminHint(wrapped) != AdminHint(swo.ErrPauseBudget) {
		t.Errorf("a failed run's hint is not its cause's: %q", AdminHint(wrapped))
	}
}
