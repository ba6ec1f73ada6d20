// Package progressview renders a switchover's progress for the example
// programs: on a terminal one line redrawn in place with a bar, otherwise
// plain lines a log can keep.
package progressview

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/pgswo/swo"
)

// New returns a View writing to w; tty: w is a terminal (IsTerminal).
func New(w io.Writer, tty bool) *View { return &View{w: w, tty: tty} }

// View shows a run's progress: on a terminal one line redrawn in
// place, otherwise a plain line at each change of state, phase or table,
// and at most every 10 seconds in between.
type View struct {
	w       io.Writer
	tty     bool
	drawn   int    // length of the line on the terminal
	lastKey string // state, phase and table of the last plain line
	lastAt  time.Time
}

func (p *View) Show(s swo.Status) {
	line := s.State.String()
	key := line
	if s.Progress != nil {
		line += " | " + Text(s.Progress, p.tty)
		key += "|" + string(s.Progress.Phase) + "|" + s.Progress.Table
	}
	if !p.tty {
		if key != p.lastKey || time.Since(p.lastAt) >= 10*time.Second {
			fmt.Fprintln(p.w, line)
			p.lastKey, p.lastAt = key, time.Now()
		}
		return
	}
	pad := ""
	if n := p.drawn - len(line); n > 0 {
		pad = strings.Repeat(" ", n)
	}
	fmt.Fprint(p.w, "\r"+line+pad)
	p.drawn = len(line)
}

// End finishes the terminal's line.
func (p *View) End() {
	if p.tty && p.drawn > 0 {
		fmt.Fprintln(p.w)
		p.drawn = 0
	}
}

// Text renders a phase's progress: phase, table, rows done of the
// total (with a bar on a terminal), rate and ETA.
func Text(p *swo.Progress, bar bool) string {
	parts := []string{string(p.Phase)}
	if p.Table != "" {
		parts = append(parts, p.Table)
	}
	// The phases that rebuild or refresh objects count those, not rows.
	unit := "rows"
	switch p.Phase {
	case swo.PhaseRebuildIndexes:
		unit = "indexes and keys"
	case swo.PhaseRefreshMatViews:
		unit = "views"
	case swo.PhaseValidating:
		unit = "foreign keys"
	case swo.PhaseIncremental:
		unit = "changes"
	}
	switch {
	case p.RowsTotal > 0:
		frac := min(float64(p.RowsDone)/float64(p.RowsTotal), 1)
		done := fmt.Sprintf("%s/%s %s (%d%%)", Count(p.RowsDone), Count(p.RowsTotal), unit, int(frac*100))
		if bar {
			const width = 20
			n := int(frac * width)
			done = "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "] " + done
		}
		parts = append(parts, done)
	case p.RowsDone > 0:
		parts = append(parts, Count(p.RowsDone)+" "+unit)
	}
	if p.RowsPerSec > 0 && (unit == "rows" || unit == "changes") {
		parts = append(parts, Count(int64(p.RowsPerSec))+" "+unit+"/s")
	}
	if p.ETAMS > 0 {
		eta := time.Duration(p.ETAMS) * time.Millisecond
		if eta >= time.Second {
			eta = eta.Round(time.Second)
		} else {
			eta = eta.Round(100 * time.Millisecond)
		}
		parts = append(parts, "ETA "+eta.String())
	}
	return strings.Join(parts, " | ")
}

// Count renders n with thousands separators: 1,234,567.
func Count(n int64) string {
	s := fmt.Sprint(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// IsTerminal reports whether w is a terminal (a character device), where
// progress is redrawn in place.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || os.Getenv("TERM") == "dumb" {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
