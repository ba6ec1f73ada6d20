package progressview

import (
	"bytes"
	"strings"
	"testing"

	"github.com/pgswo/swo"
)

// TestProgressDisplay: the terminal's bar redrawn in place, and plain lines
// only when something changes.
func TestProgressDisplay(t *testing.T) {
	p := &swo.Progress{Phase: swo.PhaseInitialCopy, Table: "public.orders", RowsDone: 50000, RowsTotal: 200000, RowsPerSec: 12345.6, ETAMS: 12400}
	if got, want := Text(p, true), "initial copy | public.orders | [#####...............] 50,000/200,000 rows (25%) | 12,345 rows/s | ETA 12s"; got != want {
		t.Errorf("bar:\n got %q\nwant %q", got, want)
	}
	if got, want := Text(&swo.Progress{Phase: swo.PhaseIncremental, RowsDone: 1234567}, false), "incremental sync | 1,234,567 changes"; got != want {
		t.Errorf("plain: got %q, want %q", got, want)
	}

	if got, want := Text(&swo.Progress{Phase: swo.PhaseRebuildIndexes, Table: "public.orders", RowsDone: 1, RowsTotal: 4, RowsPerSec: 2}, false),
		"rebuild indexes | public.orders | 1/4 indexes and keys (25%)"; got != want {
		t.Errorf("indexes: got %q, want %q", got, want)
	}

	var term bytes.Buffer
	v := New(&term, true)
	v.Show(swo.Status{State: swo.StateSyncing, Progress: p})
	v.Show(swo.Status{State: swo.StatePausing})
	v.End()
	first := "syncing | " + Text(p, true)
	if want := "\r" + first + "\r" + "pausing" + strings.Repeat(" ", len(first)-len("pausing")) + "\n"; term.String() != want {
		t.Errorf("terminal: %q", term.String())
	}

	var plain bytes.Buffer
	v = New(&plain, false)
	v.Show(swo.Status{State: swo.StateSyncing, Progress: p})
	p2 := *p
	p2.RowsDone = 60000
	v.Show(swo.Status{State: swo.StateSyncing, Progress: &p2}) // same phase and table: no line
	v.Show(swo.Status{State: swo.StateExecuting})
	v.End()
	if got := strings.Count(plain.String(), "\n"); got != 2 || strings.Contains(plain.String(), "\r") || strings.Contains(plain.String(), "[#") {
		t.Errorf("plain output:\n%s", plain.String())
	}
}
