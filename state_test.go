package swo

import (
	"encoding/json"
	"testing"
)

func TestStateNamesRoundTrip(t *testing.T) {
	seen := map[string]bool{}
	for _, s := range States() {
		name := s.String()
		if name == "" || seen[name] {
			t.Fatalf("state %d has an empty or repeated name %q", int(s), name)
		}
		seen[name] = true
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		var back State
		if err := json.Unmarshal(b, &back); err != nil || back != s {
			t.Fatalf("%s: JSON round trip gave %v, %v", name, back, err)
		}
	}
	for _, want := range []string{"unknown", "resetting", "idle", "syncing", "pausing", "executing", "done", "failed"} {
		if !seen[want] {
			t.Fatalf("state %q missing (R4)", want)
		}
	}
	if _, err := json.Marshal(State(99)); err == nil {
		t.Fatal("an invalid state marshalled")
	}
	var s State
	if err := json.Unmarshal([]byte(`"bogus"`), &s); err == nil {
		t.Fatal("an unknown state name parsed")
	}
}

func TestStateTransitions(t *testing.T) {
	happy := []State{StateUnknown, StateResetting, StateIdle, StateSyncing, StatePausing, StateExecuting, StateDone}
	for i := 1; i < len(happy); i++ {
		if !happy[i-1].CanTransition(happy[i]) {
			t.Errorf("%s -> %s must be allowed (a successful run)", happy[i-1], happy[i])
		}
	}
	for _, s := range States() {
		if s != StateDone && !s.CanTransition(StateResetting) && s != StateResetting {
			t.Errorf("RESET must be possible from %s", s)
		}
		if s != StateDone && !s.CanTransition(StateFailed) {
			t.Errorf("%s must be able to fail", s)
		}
		if StateDone.CanTransition(s) {
			t.Errorf("done is final, but done -> %s is allowed", s)
		}
	}
	forbidden := [][2]State{
		{StateIdle, StatePausing}, {StateIdle, StateExecuting}, {StateIdle, StateDone},
		{StateSyncing, StateExecuting}, {StateSyncing, StateDone}, {StateSyncing, StateIdle},
		{StatePausing, StateDone}, {StatePausing, StateSyncing}, {StateExecuting, StatePausing},
		{StateFailed, StateIdle}, {StateFailed, StateSyncing}, {StateUnknown, StateSyncing},
	}
	for _, f := range forbidden {
		if f[0].CanTransition(f[1]) {
			t.Errorf("%s -> %s must not be allowed", f[0], f[1])
		}
	}
	if !StateSyncing.Running() || StateIdle.Running() || StateDone.Running() {
		t.Error("Running() is wrong")
	}
}
