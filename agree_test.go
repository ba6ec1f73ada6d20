package swo

import (
	"errors"
	"strings"
	"testing"
)

// TestNodesMustAgreeOnWhatMoves starts a node that excludes a table its
// peer moves: which tables move would depend on which node leads, so the
// configuration is invalid on every node, RESET says why and EXECUTE is
// refused.
func TestNodesMustAgreeOnWhatMoves(t *testing.T) {
	tc := newCluster(t, 2, false, func(i int, cfg *Config) {
		if i == 1 {
			cfg.ExcludeTables = []string{"public.notes"}
		}
	})
	waitFor(t, func() bool {
		for _, n := range tc.nodes[0].Status().Nodes {
			if n.ConfigValid || !strings.Contains(n.ConfigError, "ExcludeTables") {
				return false
			}
		}
		return true
	})
	ctx := testCtx(t)
	if err := tc.nodes[0].Reset(ctx); !errors.Is(err, ErrResetFailed) || !strings.Contains(err.Error(), "settings that must be equal") {
		t.Fatalf("RESET with nodes disagreeing on ExcludeTables: %v", err)
	}
	if err := tc.nodes[1].Execute(ctx); !errors.Is(err, ErrNotReady) {
		t.Fatalf("EXECUTE with nodes disagreeing on ExcludeTables: %v", err)
	}
}

// TestNodeOfAnotherNamespaceIsNoticed starts an instance of the same service
// with another Namespace: it takes another lock and would go on writing to
// the old database after the switch, so the configuration is invalid.
func TestNodeOfAnotherNamespaceIsNoticed(t *testing.T) {
	tc := newCluster(t, 1, false, nil)
	stray := newConnector(t, Config{OldURL: tc.old.URL, NextURL: tc.next.URL, Namespace: "other", NodeName: "stray"})
	waitFor(t, func() bool { return len(stray.Status().Nodes) == 1 }) // it has beaten its heartbeat
	ctx := testCtx(t)
	err := tc.nodes[0].Reset(ctx)
	if !errors.Is(err, ErrResetFailed) || !strings.Contains(err.Error(), `namespace "other": stray`) {
		t.Fatalf("RESET with a node in another namespace: %v", err)
	}
	if s := tc.nodes[0].Status(); s.Node.ConfigValid || !strings.Contains(s.Node.ConfigError, "Config.Namespace") {
		t.Fatalf("status: valid %v, %q", s.Node.ConfigValid, s.Node.ConfigError)
	}
	if err := tc.nodes[0].Execute(ctx); !errors.Is(err, ErrNotReady) {
		t.Fatalf("EXECUTE with a node in another namespace: %v", err)
	}
	stray.Close()
	// Once it is gone (after a timeout: it left its row), the cluster is valid again.
	waitFor(t, func() bool { return tc.nodes[0].Reset(ctx) == nil })
}
