package swo

import (
	"testing"

	"github.com/pgswo/swo/internal/replicate"
)

// TestPhasesMatchTheEngines keeps the exported phases equal to the ones the
// engine reports, so that a host can switch on Progress.Phase.
func TestPhasesMatchTheEngines(t *testing.T) {
	t.Parallel()
	pairs := map[string]Phase{
		replicate.PhaseInitialCopy: PhaseInitialCopy, replicate.PhaseRebuildIndexes: PhaseRebuildIndexes,
		replicate.PhaseRefreshMatViews: PhaseRefreshMatViews, replicate.PhaseIncremental: PhaseIncremental,
		replicate.PhasePausing: PhasePausing, replicate.PhaseFinalSync: PhaseFinalSync,
		replicate.PhaseSealing: PhaseSealing, replicate.PhaseValidating: PhaseValidating, replicate.PhaseDone: PhaseDone,
	}
	if len(pairs) != 9 {
		t.Fatalf("the engine's phases are not distinct: %v", pairs)
	}
	for engine, public := range pairs {
		if string(public) != engine {
			t.Errorf("phase %q is exported as %q", engine, public)
		}
	}
}
