package replicate

import (
	"bytes"
	"sync"
	"sync/atomic"
	"time"
)

// The phases a run reports, in order. The root package exports them as
// swo.Phase values (a test keeps the two lists equal).
const (
	PhaseInitialCopy     = "initial copy"
	PhaseRebuildIndexes  = "rebuild indexes"
	PhaseRefreshMatViews = "refresh materialized views"
	PhaseIncremental     = "incremental sync"
	PhasePausing         = "pausing"
	PhaseFinalSync       = "final sync"
	PhaseSealing         = "sealing the old database"
	PhaseValidating      = "validating foreign keys"
	PhaseDone            = "done"
)

// Progress tracks a run for Status. Counters are updated by the copy
// workers as bytes stream through; readers take a Snapshot at any time.
type Progress struct {
	mu      sync.Mutex
	phase   string
	table   string
	started time.Time // of the phase

	rowsDone, rowsTotal   atomic.Int64
	bytesDone, bytesTotal atomic.Int64
}

// Snapshot is a consistent view of the progress.
type Snapshot struct {
	Phase      string        `json:"phase"`
	Table      string        `json:"table,omitempty"`
	RowsDone   int64         `json:"rows_done"`
	RowsTotal  int64         `json:"rows_total"`
	BytesDone  int64         `json:"bytes_done"`
	BytesTotal int64         `json:"bytes_total"`
	RowsPerSec float64       `json:"rows_per_sec"`
	Elapsed    time.Duration `json:"elapsed_ns"`
	ETA        time.Duration `json:"eta_ns"` // 0 when unknown
}

// SetPhase starts a phase with the given totals (0 when unknown).
func (p *Progress) SetPhase(phase string, rowsTotal, bytesTotal int64) {
	p.mu.Lock()
	p.phase, p.table, p.started = phase, "", time.Now()
	p.mu.Unlock()
	p.rowsDone.Store(0)
	p.bytesDone.Store(0)
	p.rowsTotal.Store(rowsTotal)
	p.bytesTotal.Store(bytesTotal)
}

// SetTable names the table being worked on.
func (p *Progress) SetTable(table string) {
	p.mu.Lock()
	p.table = table
	p.mu.Unlock()
}

// Add counts rows and bytes done.
func (p *Progress) Add(rows, bytes int64) {
	p.rowsDone.Add(rows)
	p.bytesDone.Add(bytes)
}

// Snapshot returns the current progress.
func (p *Progress) Snapshot() Snapshot {
	p.mu.Lock()
	s := Snapshot{Phase: p.phase, Table: p.table}
	started := p.started
	p.mu.Unlock()
	s.RowsDone, s.RowsTotal = p.rowsDone.Load(), p.rowsTotal.Load()
	if s.RowsTotal > 0 && s.RowsDone > s.RowsTotal {
		s.RowsTotal = s.RowsDone // totals are estimates
	}
	s.BytesDone, s.BytesTotal = p.bytesDone.Load(), p.bytesTotal.Load()
	if !started.IsZero() {
		s.Elapsed = time.Since(started)
	}
	if secs := s.Elapsed.Seconds(); secs > 0 {
		s.RowsPerSec = float64(s.RowsDone) / secs
	}
	if s.RowsPerSec > 0 && s.RowsTotal > s.RowsDone {
		s.ETA = time.Duration(float64(s.RowsTotal-s.RowsDone) / s.RowsPerSec * float64(time.Second))
	}
	return s
}

// countingWriter counts COPY text rows (one newline each: embedded newlines
// are escaped) and bytes as they stream.
type countingWriter struct {
	w interface{ Write([]byte) (int, error) }
	p *Progress
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	if c.p != nil {
		c.p.Add(int64(bytes.Count(b[:n], []byte{'\n'})), int64(n))
	}
	return n, err
}
