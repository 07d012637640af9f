// fs/key_gate.h: requests and the key watcher, with real threads.
#include "fs/key_gate.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace envelopefs {
namespace {

using namespace std::chrono_literals;

TEST(KeyGate, ClosedRefusesAndOpenAdmits) {
  KeyGate gate;
  ASSERT_TRUE(gate.enter());
  gate.leave();
  gate.close();
  EXPECT_TRUE(gate.closed());
  EXPECT_FALSE(gate.enter());
  gate.open();
  EXPECT_TRUE(gate.enter());
  gate.leave();
}

TEST(KeyGate, CloseWaitsForTheRequestInside) {
  KeyGate gate;
  ASSERT_TRUE(gate.enter());
  std::atomic<bool> closed{false};
  std::thread watcher([&] {
    gate.close();
    closed = true;
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(closed) << "close() returned while a request was still using the keys";
  gate.leave();
  watcher.join();
  EXPECT_TRUE(closed);
}

TEST(KeyGate, APausedGateHoldsRequestsAndLetsThemOnWhenItOpens) {
  KeyGate gate;
  gate.pause();
  std::atomic<int> result{-1};
  std::thread request([&] {
    result = gate.enter() ? 1 : 0;
    if (result == 1) gate.leave();
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(result, -1) << "a request went past a paused gate";
  gate.open();
  request.join();
  EXPECT_EQ(result, 1) << "a request held by a pause must go on, not fail";
}

TEST(KeyGate, ARequestHeldByAPauseFailsIfTheGateThenCloses) {
  KeyGate gate;
  gate.pause();
  std::atomic<int> result{-1};
  std::thread request([&] { result = gate.enter() ? 1 : 0; });
  std::this_thread::sleep_for(50ms);
  gate.close();
  request.join();
  EXPECT_EQ(result, 0);
}

}  // namespace
}  // namespace envelopefs
