// WiFi scan: lists the networks in range on the serial monitor (115200 baud) every 10 s.
#if defined(ESP8266)
#include <ESP8266WiFi.h>
#else
#include <WiFi.h>
#endif

void setup() {
  Serial.begin(115200);
  WiFi.mode(WIFI_STA);
}

void loop() {
  int n = WiFi.scanNetworks();
  Serial.printf("%d networks\n", n);
  for (int i = 0; i < n; i++) {
    Serial.printf("%2d  %-32s  %4d dBm  channel %d\n", i + 1, WiFi.SSID(i).c_str(),
                  (int)WiFi.RSSI(i), (int)WiFi.channel(i));
  }
  WiFi.scanDelete();
  delay(10000);
}
