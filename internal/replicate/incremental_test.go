package replicate

import (
	"errors"
	"testing"
	"time"
)

func TestRoundSizer(t *testing.T) {
	t.Parallel()
	round := func(changes int, backlog int64, d time.Duration) RoundResult {
		return RoundResult{Changes: changes, Backlog: backlog, Duration: d}
	}
	t.Run("a slow link grows the rounds, then gives up if the backlog still grows", func(t *testing.T) {
		s := newRoundSizer()
		backlog := int64(10000)
		var err error
		rounds := 0
		for ; err == nil && rounds < 100; rounds++ {
			backlog += 1000 // every round is slow and full, and the backlog grows
			err = s.next(round(s.limit, backlog, 2*time.Second))
		}
		if !errors.Is(err, ErrCannotKeepUp) {
			t.Fatalf("after %d losing rounds: %v, want ErrCannotKeepUp", rounds, err)
		}
		// 5000 → 200000 is 6 doublings (the first round has no previous
		// backlog to compare with), then losingRoundsMax rounds at the top.
		if want := 1 + 6 + losingRoundsMax; rounds != want {
			t.Errorf("gave up after %d rounds, want %d", rounds, want)
		}
	})
	t.Run("a round of the largest size that gains resets the count", func(t *testing.T) {
		s := &roundSizer{limit: maxRound, prev: 0}
		backlog := int64(1)
		for i := range 3 * losingRoundsMax {
			if i%(losingRoundsMax-1) == 0 {
				backlog -= 10 // one winning round now and then
			} else {
				backlog += 10
			}
			if err := s.next(round(maxRound, backlog, 3*time.Second)); err != nil {
				t.Fatalf("round %d: %v", i, err)
			}
		}
		if s.limit != maxRound {
			t.Errorf("limit %d, want it kept at %d", s.limit, maxRound)
		}
	})
	t.Run("quick full rounds double, slow full rounds that gain halve", func(t *testing.T) {
		s := newRoundSizer()
		_ = s.next(round(s.limit, 100000, 100*time.Millisecond))
		if s.limit != 2*firstRound {
			t.Fatalf("after a quick full round: %d, want %d", s.limit, 2*firstRound)
		}
		_ = s.next(round(s.limit, 90000, 6*time.Second))
		if s.limit != firstRound {
			t.Fatalf("after a slow full round that gained: %d, want %d", s.limit, firstRound)
		}
		_ = s.next(round(s.limit, 80000, 2*time.Second)) // neither quick nor very slow, gaining: kept
		if s.limit != firstRound {
			t.Fatalf("after a middling round: %d, want %d", s.limit, firstRound)
		}
		for range 10 {
			_ = s.next(round(s.limit, 70000, 10*time.Second))
		}
		if s.limit != minRound {
			t.Fatalf("after slow rounds: %d, want the floor %d", s.limit, minRound)
		}
		_ = s.next(round(10, 5, 10*time.Second)) // not full: nothing to learn
		if s.limit != minRound || s.losing != 0 {
			t.Fatalf("after a partial round: %+v", s)
		}
	})
}
